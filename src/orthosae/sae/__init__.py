"""Sparse autoencoders: TopK and the standard ReLU+L1 SAE, plus strict save/load."""

from orthosae.sae.base import SAE, SAEOutput
from orthosae.sae.io import load_sae, save_sae
from orthosae.sae.relu import ReLUSAE
from orthosae.sae.topk import TopKSAE

__all__ = ["SAE", "ReLUSAE", "SAEOutput", "TopKSAE", "load_sae", "save_sae"]
