"""Padding token lists into batches: the one place hfx pads (evaluation, synthesis, training, quanta, lens)."""

from __future__ import annotations

import torch


def padded(
    rows: list[list[int]], pad_id: int = 0, side: str = "right", device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded with ``pad_id`` on the ``side`` given.

    Right padding keeps every row's first token in column 0 (teacher forcing, scoring); left padding puts every
    row's last token in the last column (generation, ``logits_to_keep=1``).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
    if not rows:
        raise ValueError("Nothing to pad: no rows.")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, values in enumerate(rows):
        columns = slice(0, len(values)) if side == "right" else slice(width - len(values), width)
        ids[index, columns] = torch.as_tensor(values, dtype=torch.long)
        mask[index, columns] = 1
    return ids.to(device), mask.to(device)


def left_padded(rows: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of token lists padded on the left, so that every row's last
    token sits in the last column (where `logits_to_keep=1` reads); positions count real tokens from 0."""
    ids, mask = padded(rows, side="left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), position_ids.to(device)
