"""The bucketed decode loop on CUDA: each bucket's step captured once as a CUDA graph and replayed across calls, the
same tokens and teacher top-k as the eager loop on the CPU (float32), finite in bfloat16.

Tolerances: float32 greedy tokens identical (a tiny random Llama with a large init scale: no near-ties), top-k
log-probabilities atol 1e-4; bfloat16: every value finite, greedy tokens of the first step identical.
"""

from __future__ import annotations

import pytest
import torch

from hfx.attention import use_grouped_sdpa
from hfx.cartridges.prefix import PrefixKV
from hfx.generation import PrefixDecoder
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.gpu


def tiny(tokenizer, device, dtype=torch.float32):
    model = make_tiny_llama(tokenizer, layers=2, hidden=64, init_std=0.3).to(device, dtype)
    use_grouped_sdpa(model)
    return model


def prompts_of(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 200, (n,), generator=generator).tolist() for n in lengths]


def test_cuda_graph_decode_matches_the_cpu_and_captures_once_per_bucket(tiny_tokenizer):
    cpu_model, cuda_model = tiny(tiny_tokenizer, "cpu"), tiny(tiny_tokenizer, "cuda")
    cpu, cuda = PrefixDecoder(cpu_model), PrefixDecoder(cuda_model)
    assert cuda.cuda_graphs and not cpu.cuda_graphs
    captures = None
    for call, (chunk, lengths) in enumerate(((100, (3, 9, 5)), (90, (7, 2, 12)), (95, (4, 10, 4)))):
        prefix_ids = prompts_of((chunk,), seed=call)[0]
        prompts = prompts_of(lengths, seed=10 + call)
        expected = cpu.generate(
            PrefixKV.prefill(cpu_model, prefix_ids), prompts, max_new_tokens=12, pad_token_id=0, top_k=8
        )
        got = cuda.generate(
            PrefixKV.prefill(cuda_model, prefix_ids), prompts, max_new_tokens=12, pad_token_id=0, top_k=8
        )
        assert got.token_ids == expected.token_ids
        torch.testing.assert_close(got.topk_logprobs, expected.topk_logprobs, atol=1e-4, rtol=0)
        if captures is None:
            captures = cuda.stats.graph_captures
            assert captures == 1
    assert cuda.stats.graph_captures == captures  # the later calls replayed the first call's graph
    assert len(cuda.stats.shapes) == 2


def test_bfloat16_sampling_on_cuda_is_finite(tiny_tokenizer):
    model = tiny(tiny_tokenizer, "cuda", torch.bfloat16)
    decoder = PrefixDecoder(model)
    prefix = PrefixKV.prefill(model, prompts_of((300,))[0])
    out = decoder.generate(
        prefix, prompts_of((3, 9, 5, 1, 14)), max_new_tokens=20, pad_token_id=0, temperature=0.8, top_k=16
    )
    assert torch.isfinite(out.topk_logprobs).all()
    assert all(0 <= t < model.config.vocab_size for row in out.token_ids for t in row)
    assert decoder.stats.graph_captures == 1
