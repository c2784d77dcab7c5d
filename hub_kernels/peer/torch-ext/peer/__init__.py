"""PEER (Parameter Efficient Expert Retrieval) expert-sum kernels in Triton."""

from . import layers
from ._peer_triton import ACTIVATIONS, peer_experts

__all__ = ["ACTIVATIONS", "layers", "peer_experts"]
