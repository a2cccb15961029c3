"""Sparse autoencoders: one module per architecture (SAE class + training rule), plus strict save/load."""

from orthosae.sae.base import SAE, SAEOutput
from orthosae.sae.batchtopk import BatchTopKSAE
from orthosae.sae.io import load_sae, save_sae
from orthosae.sae.jumprelu import JumpReLUSAE
from orthosae.sae.matryoshka import MatryoshkaSAE
from orthosae.sae.relu import ReLUSAE
from orthosae.sae.topk import TopKSAE

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "SAEOutput",
    "TopKSAE",
    "load_sae",
    "save_sae",
]
