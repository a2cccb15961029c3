"""orthosae: TopK sparse autoencoders with an orthogonality regulariser, for language-model activations."""

__version__ = "0.2.0"
