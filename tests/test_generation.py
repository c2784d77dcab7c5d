"""The bucketed decode loop: same tokens as generate, few shapes, no recompilation after warm-up, no empty rows."""

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from hfx.attention import use_grouped_sdpa
from hfx.cartridges.prefix import PrefixKV
from hfx.generation import PrefixDecoder, bucket
from hfx.models import seeded
from tests.conftest import make_tiny_llama


def test_cache_lengths_follow_the_ladder_then_steps_of_512():
    from hfx.generation import bucket_length

    assert [bucket_length(n) for n in (1, 65, 700, 1500, 2048)] == [64, 128, 768, 1536, 2048]
    # a long cache wastes less than one step: a 2,048-token cartridge with its prompt and answer, a 32k context
    assert [bucket_length(n) for n in (2049, 2208, 32928, 131232)] == [2560, 2560, 33280, 131584]
    for n in range(2049, 40000, 997):
        assert n <= bucket_length(n) < n + 512 and bucket_length(n) % 512 == 0


def test_bucket_ladder():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 33)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert [bucket(n, 64) for n in (1, 64, 65, 129, 200, 700)] == [64, 64, 128, 192, 256, 768]
    for n in range(3, 3000):
        assert n <= bucket(n) <= 1.5 * n
    with pytest.raises(ValueError):
        bucket(0)


@pytest.mark.parametrize("implementation", ["sdpa_gqa", "eager"])
def test_greedy_tokens_match_generate_on_whole_prompts(tokenizer, implementation):
    model = make_tiny_llama(tokenizer)
    use_grouped_sdpa(model)
    if implementation == "eager":
        model.set_attn_implementation("eager")
    prefix_ids = torch.randint(100, 1000, (10,)).tolist()
    prompts = [torch.randint(100, 1000, (n,)).tolist() for n in (3, 6, 1)]
    prefix = PrefixKV.prefill(model, prefix_ids)
    decoder = PrefixDecoder(model)
    out = decoder.generate(prefix, prompts, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, top_k=5)
    for row, prompt in enumerate(prompts):
        alone = model.generate(
            torch.tensor([prefix_ids + prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
        assert out.token_ids[row] == alone[0, len(prefix_ids) + len(prompt) :].tolist()
        # the teacher's top-k at each new token is the model's own distribution there
        with torch.no_grad():
            full = model(torch.tensor([prefix_ids + prompt + out.token_ids[row]])).logits[0].float()
        start = len(prefix_ids) + len(prompt) - 1
        expected = torch.log_softmax(full[start : start + 12], -1).topk(5, -1)
        assert torch.equal(out.topk_ids[row], expected.indices)
        torch.testing.assert_close(out.topk_logprobs[row], expected.values, rtol=1e-4, atol=1e-4)


def test_stop_tokens_end_a_row_and_are_kept(tiny_model, tokenizer):
    use_grouped_sdpa(tiny_model)
    prompts = [[300, 301, 302], [400, 401]]
    decoder = PrefixDecoder(tiny_model, sync_every=2)
    free = decoder.generate(None, prompts, max_new_tokens=10, pad_token_id=0)
    stop = free.token_ids[0][3]
    stopped = decoder.generate(None, prompts, max_new_tokens=10, pad_token_id=0, stop_token_ids=[stop])
    first = free.token_ids[0].index(stop)
    assert stopped.token_ids[0] == free.token_ids[0][: first + 1]
    for row in (1,):
        seq = free.token_ids[row]
        assert stopped.token_ids[row] == (seq[: seq.index(stop) + 1] if stop in seq else seq)


def test_sampling_is_seeded_and_follows_the_temperature(tiny_model):
    use_grouped_sdpa(tiny_model)
    decoder = PrefixDecoder(tiny_model)
    prompts = [[300, 301, 302]] * 6

    def draw(seed, temperature):
        with seeded(seed):
            return decoder.generate(
                None, prompts, max_new_tokens=8, pad_token_id=0, temperature=temperature
            ).token_ids

    assert draw(1, 1.0) == draw(1, 1.0)
    assert draw(1, 1.0) != draw(2, 1.0)
    greedy = decoder.generate(None, prompts, max_new_tokens=8, pad_token_id=0).token_ids
    assert draw(3, 1e-4) == greedy  # a near-zero temperature is greedy
    assert len({tuple(row) for row in draw(4, 5.0)}) > 1  # rows of one call draw apart


class ShapeRecorder:
    """An attention function (registered with transformers) that records the shapes it runs on and checks that no
    query row of the mask is empty, then calls transformers' SDPA."""

    def __init__(self):
        self.shapes = set()
        self.empty_rows = 0

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.shapes.add((query.shape[0], query.shape[2], key.shape[2]))
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            self.empty_rows += int((~attention_mask.any(-1)).sum())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def test_two_calls_on_different_chunk_lengths_share_the_buckets(tokenizer):
    recorder = ShapeRecorder()
    AttentionInterface.register("hfx_test_recorder", recorder)
    AttentionMaskInterface.register("hfx_test_recorder", sdpa_mask)
    model = make_tiny_llama(tokenizer)
    model.set_attn_implementation("hfx_test_recorder")
    decoder = PrefixDecoder(model)
    for chunk, prompt_lengths in ((300, (5, 9, 11, 2)), (340, (4, 12, 1, 1)), (290, (9, 7, 7, 3))):
        prefix = PrefixKV.prefill(model, torch.randint(100, 1000, (chunk,)).tolist())
        recorder.shapes.clear()
        prompts = [torch.randint(100, 1000, (n,)).tolist() for n in prompt_lengths]
        decoder.generate(prefix, prompts, max_new_tokens=10, pad_token_id=0)
        assert len(recorder.shapes) == 2  # one prefill, one decode shape
    # three calls (chunks of 290-340 tokens, four prompts of 1-12 tokens) ran in the same two shapes
    assert decoder.stats.shapes == {(4, 16, 384), (4, 1, 384)}
    assert recorder.empty_rows == 0


def test_compiled_step_does_not_recompile_after_warm_up(tokenizer):
    model = make_tiny_llama(tokenizer)
    use_grouped_sdpa(model)
    decoder = PrefixDecoder(model, compile=True, compile_backend="eager")
    eager = PrefixDecoder(model)
    prefix = PrefixKV.prefill(model, torch.randint(100, 1000, (50,)).tolist())
    prompts = [[300, 301, 302], [400, 401]]
    expected = eager.generate(prefix, prompts, max_new_tokens=6, pad_token_id=0).token_ids
    assert decoder.generate(prefix, prompts, max_new_tokens=6, pad_token_id=0).token_ids == expected
    warm = decoder.stats.compiles
    assert warm >= 1
    for chunk in (40, 46):  # other prefixes and prompts in the same bucket
        prefix = PrefixKV.prefill(model, torch.randint(100, 1000, (chunk,)).tolist())
        decoder.generate(prefix, [[5, 6], [7, 8, 9]], max_new_tokens=6, pad_token_id=0)
    assert decoder.stats.compiles == warm
    assert decoder.stats.graph_captures == 0  # CUDA graphs only on CUDA
    assert decoder.stats.host_syncs <= decoder.stats.steps // decoder.sync_every + decoder.stats.calls


def test_decoder_refuses_an_attention_without_4d_masks(tiny_model):
    tiny_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D attention mask"):
        PrefixDecoder(tiny_model)
