"""orthosae: TopK sparse autoencoders with an orthogonality regulariser, for language-model activations."""

from orthosae.allocator import prefer_huge_pages

prefer_huge_pages()  # before anything allocates a tensor: see orthosae.allocator

__version__ = "0.1.0"
