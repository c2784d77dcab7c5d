"""Token selection: the trigram induction filter, the loss threshold in bits, skip and num_tokens, errors."""

from __future__ import annotations

import math

import datasets
import pytest

from hfx.quanta.filters import FilterConfig, induction_mask, select_tokens
from hfx.quanta.losses import FEATURES


def test_induction_mask_on_handmade_sequences():
    # a b c d a b c -> the second "c" completes the trigram (a, b, c) seen before
    assert induction_mask([1, 2, 3, 4, 1, 2, 3]) == [False, False, False, False, False, False, True]
    # a repeated bigram alone is not enough: (a, b, x) is new
    assert induction_mask([1, 2, 3, 1, 2, 9]) == [False] * 6
    # "a a a a": (a, a, a) first ends at 2, then repeats at 3
    assert induction_mask([5, 5, 5, 5]) == [False, False, False, True]
    # only earlier occurrences count, and the first two tokens never match
    assert induction_mask([7, 8]) == [False, False]
    assert induction_mask([1, 2, 3, 9, 9, 1, 2, 3, 1, 2, 4]) == [False] * 7 + [True, False, False, False]


class ToyTokenizer:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def losses_dataset(windows):
    rows = []
    for window_id, (doc_id, start, ids, bits) in enumerate(windows):
        rows.append(
            {
                "window_id": window_id,
                "doc_id": doc_id,
                "doc_name": f"doc{doc_id}",
                "start": start,
                "input_ids": ids,
                "losses_nats": [math.nan] + [b * math.log(2) for b in bits[1:]],
            }
        )
    return datasets.Dataset.from_list(rows, features=FEATURES)


def test_selection_applies_threshold_induction_across_windows_skip_and_limit():
    # doc 0 is split over two windows of 4 tokens; its trigram (1, 2, 3) repeats in the second window.
    losses = losses_dataset(
        [
            (0, 0, [1, 2, 3, 4], [0, 0.05, 0.01, 0.5]),
            (0, 4, [1, 2, 3, 6], [0, 0.02, 0.03, 0.04]),
            (1, 0, [1, 2, 3, 8], [0, 0.09, 0.2, 0.01]),
        ]
    )
    rows = select_tokens(losses, ToyTokenizer(), FilterConfig(loss_threshold_bits=0.1))
    kept = [(r["window_id"], r["position"]) for r in rows]
    # window 0: pos 1 (0.05), pos 2 (0.01); pos 3 too lossy. window 1: pos 1 -> doc position 5 = (3, 1, 2)? new;
    # pos 2 -> doc position 6 = trigram (1, 2, 3) seen at 0..2 -> induction, dropped; pos 3 (6) kept.
    # doc 1 starts fresh: (1, 2, 3) is new there; pos 2 is 0.2 bits -> dropped.
    assert kept == [(0, 1), (0, 2), (1, 1), (1, 3), (2, 1), (2, 3)]
    first = rows[0]
    assert first["token_index"] == 0 * 4 + 1 and first["token_id"] == 2 and first["context_ids"] == [1]
    assert first["context"] == "t1" and first["token"] == "t2"
    assert abs(first["loss_bits"] - 0.05) < 1e-6

    every_second = select_tokens(
        losses, ToyTokenizer(), FilterConfig(loss_threshold_bits=0.1, skip=2, num_tokens=2)
    )
    assert [(r["window_id"], r["position"]) for r in every_second] == [(0, 1), (1, 1)]
    keep_induction = select_tokens(
        losses, ToyTokenizer(), FilterConfig(loss_threshold_bits=0.1, drop_induction=False)
    )
    assert (1, 2) in [(r["window_id"], r["position"]) for r in keep_induction]


def test_a_threshold_that_keeps_nothing_is_a_clear_error():
    losses = losses_dataset([(0, 0, [1, 2, 3], [0, 3.0, 4.0])])
    with pytest.raises(
        ValueError, match=r"no token kept: of 2 tokens, 0 have loss < 0.5 bits.*--loss_threshold_bits"
    ):
        select_tokens(losses, ToyTokenizer(), FilterConfig(loss_threshold_bits=0.5))
    with pytest.raises(ValueError, match="skip must be >= 1"):
        FilterConfig(skip=0)
    with pytest.raises(ValueError, match="loss_threshold_bits must be > 0"):
        FilterConfig(loss_threshold_bits=0)
