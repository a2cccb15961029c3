"""orthosae: TopK sparse autoencoders with an orthogonality regulariser, for language-model activations."""

__version__ = "0.1.0"
