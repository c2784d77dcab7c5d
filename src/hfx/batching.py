"""Batching shared by the corpus-level jobs (quanta gradients, lens activations)."""

from __future__ import annotations

import torch


def left_padded(rows: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of token lists padded on the left, so that every row's last
    token sits in the last column (where `logits_to_keep=1` reads); positions count real tokens from 0."""
    length = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, values in enumerate(rows):
        ids[index, length - len(values) :] = torch.tensor(values)
        mask[index, length - len(values) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), position_ids.to(device)
