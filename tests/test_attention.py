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


def _grouped_case(dtype, batch=3, heads=8, kv_heads=2, length=40, dim=16):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, 1, heads, dim, generator=generator).to(dtype).transpose(1, 2)  # a strided view
    key = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    # a static cache: left padding of different widths, a shared prefix, and unused slots at the end (cut off
    # by the key length: the mask is longer than the keys, as the decode loop's is)
    mask = torch.zeros(batch, 1, 1, length + 8, dtype=torch.bool)
    mask[:, :, :, :10] = True
    for row, start in enumerate((12, 15, 10)):
        mask[row, :, :, start:30] = True
    return query, key, value, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_grouped_decode_attention_is_transformers_sdpa_without_the_copy(dtype, mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value, mask = _grouped_case(dtype)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    elif mask_kind == "none":
        mask = None
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = query.shape[1] // key.shape[1]
    cut = mask[..., : key.shape[2]] if mask is not None else None  # transformers' takes the mask of the keys
    expected, _ = sdpa_attention_forward(module, query, key, value, cut, scaling=0.25)  # repeats the KV heads
    folded = attention.grouped_decode_attention(query, key, value, mask, scaling=0.25)
    assert folded.shape == expected.shape == (3, 1, 8, 16)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(folded, expected, **tolerance)
    # heads are not interchangeable: query head j reads key/value head j // 4
    swapped = attention.grouped_decode_attention(query, key.flip(1), value.flip(1), mask, scaling=0.25)
    assert not torch.allclose(swapped, expected, **tolerance)


def test_grouped_decode_attention_declines_other_shapes():
    query, key, value, mask = _grouped_case(torch.float32)
    prefill = torch.randn(3, 8, 4, 16)
    assert attention.grouped_decode_attention(prefill, key, value, None) is None  # several queries per row
    per_head = mask.expand(3, 8, 1, mask.shape[-1])
    assert attention.grouped_decode_attention(query, key, value, per_head) is None  # a mask per head


def test_off_the_cpu_decode_steps_fold_the_query_groups(monkeypatch):
    """Off the CPU (on `meta`), a step of one query per row goes through the folded grouped attention; a prefill
    (several queries) through transformers' SDPA, which repeats the heads."""
    calls = []

    def transformers_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape[2])
        return query.transpose(1, 2), None

    monkeypatch.setattr(attention, "sdpa_attention_forward", transformers_sdpa)
    module = torch.nn.Module()
    module.is_causal = True
    module.eval()
    key = torch.randn(2, 2, 24, 8, device="meta")
    mask = torch.ones(2, 1, 1, 32, dtype=torch.bool, device="meta")
    out, _ = attention.sdpa_gqa_attention_forward(
        module, torch.randn(2, 4, 1, 8, device="meta"), key, key, mask
    )
    assert out.shape == (2, 1, 4, 8) and calls == []
    attention.sdpa_gqa_attention_forward(module, torch.randn(2, 4, 5, 8, device="meta"), key, key, None)
    assert calls == [5]
