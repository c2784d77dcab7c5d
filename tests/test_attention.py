"""hfx's attention: no query is left with nothing to attend to, so a kernel that returns NaN there (cuDNN on a GPU)
cannot poison the real positions; on an accelerator the backend is never cuDNN."""

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from hfx import attention
from tests.conftest import make_tiny_llama


def nan_on_empty_rows(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention as cuDNN computes it for a query whose keys are all masked: softmax over nothing, NaN."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask[:, :, :, : key.shape[-2]], float("-inf"))
    else:
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril(
            key.shape[2] - query.shape[2]
        )
        scores = scores.masked_fill(~causal, float("-inf"))
    return (torch.softmax(scores.float(), dim=-1).to(value.dtype) @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register("hfx_test_nan_plain_mask", nan_on_empty_rows)
AttentionMaskInterface.register("hfx_test_nan_plain_mask", sdpa_mask)
AttentionInterface.register("hfx_test_nan_hfx_mask", nan_on_empty_rows)
AttentionMaskInterface.register("hfx_test_nan_hfx_mask", attention.sdpa_mask_without_empty_rows)

# left padding, and a row of padding only (a batch filled up to a fixed size)
IDS = torch.tensor([[0, 0, 5, 6, 7], [0, 0, 0, 0, 0], [7, 8, 9, 10, 11]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_all_padding_row_never_makes_nan(tokenizer, dtype):
    model = make_tiny_llama(tokenizer).to(dtype)
    model.set_attn_implementation("hfx_test_nan_plain_mask")
    with torch.no_grad():
        plain = model(input_ids=IDS, attention_mask=MASK).logits
    # transformers' own mask leaves those queries empty: the NaN reaches the row's real tokens in the next layer
    assert torch.isnan(plain[0, 2:]).all() and torch.isnan(plain[1]).all()
    assert torch.isfinite(plain[2]).all()

    model.set_attn_implementation("hfx_test_nan_hfx_mask")
    with torch.no_grad():
        fixed = model(input_ids=IDS, attention_mask=MASK).logits
    assert torch.isfinite(fixed).all()
    # and the real positions are what they are without the padding rows
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        alone = model(input_ids=IDS[2:], attention_mask=MASK[2:]).logits
        left = model(input_ids=IDS[:1, 2:]).logits
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fixed[2], alone[0], **tolerance)
    torch.testing.assert_close(fixed[0, 2:], left[0], **tolerance)


def test_hfx_mask_unmasks_only_empty_rows():
    kwargs = dict(
        batch_size=3, q_length=5, kv_length=5, attention_mask=MASK.bool(), allow_is_causal_skip=False
    )
    plain = sdpa_mask(**kwargs)
    fixed = attention.sdpa_mask_without_empty_rows(**kwargs)
    empty = ~plain.any(-1)
    assert empty.any()  # the case exists
    assert fixed.any(-1).all()
    assert torch.equal(fixed[~empty], plain[~empty])  # rows that had keys are untouched


def test_off_the_cpu_sdpa_runs_without_cudnn(monkeypatch):
    """Off the CPU (checked on `meta`) transformers' SDPA runs with cuDNN disabled and the memory-efficient kernel,
    which takes masks, enabled; on the CPU the backends are left as they are."""
    seen = []

    def transformers_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.append(
            (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
        )
        return query.transpose(1, 2), None

    monkeypatch.setattr(attention, "sdpa_attention_forward", transformers_sdpa)
    module = torch.nn.Module()
    module.is_causal = True
    query, key = torch.randn(1, 4, 3, 8, device="meta"), torch.randn(1, 2, 3, 8, device="meta")
    before = torch.backends.cuda.cudnn_sdp_enabled()
    attention.sdpa_gqa_attention_forward(module, query, key, key, None)
    assert seen == [(False, True)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # only for the call
