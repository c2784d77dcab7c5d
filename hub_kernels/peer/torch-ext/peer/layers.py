"""Kernel layers for `kernels.kernelize`.

A layer here replaces the `forward` of the model layer registered under the same name (with
`use_kernel_forward_from_hub`); it is stateless and reads its parameters and settings from the module it replaces.
"""

from __future__ import annotations

import torch
from torch import nn

from ._peer_triton import peer_experts


class PeerExperts(nn.Module):
    """PEER expert bank: `self.down_proj`, `self.up_proj` (E, m, D) and `self.activation` (str) come from the
    replaced module. hidden_states (N, D), expert_indices (N, K), expert_weights (N, K) -> (N, D)."""

    has_backward = True
    can_torch_compile = True

    def forward(
        self, hidden_states: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        return peer_experts(
            hidden_states, expert_indices, expert_weights, self.down_proj, self.up_proj, self.activation
        )


__all__ = ["PeerExperts"]
