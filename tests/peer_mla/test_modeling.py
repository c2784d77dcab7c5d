"""PEER-MLA model: config validation, retrieval vs brute force, expert sum vs reference, MLA absorbed vs naive,
latent cache, generation with and without cache, padding, expert usage, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from hfx.peer_mla import modeling_peer_mla as modeling
from hfx.peer_mla.configuration_peer_mla import PeerMlaConfig
from hfx.peer_mla.modeling_peer_mla import (
    PeerExperts,
    PeerMlaForCausalLM,
    PeerProductKeyRouter,
    latent_cache_bytes_per_token,
    peer_experts_reference,
)


def _causal_attention(query, key, value, mask, scale):
    """Softmax attention written out, queries at the end of the keys (bottom-right causal), one key head or many."""
    assert mask is None
    q_len, kv_len = query.shape[-2], key.shape[-2]
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    visible = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.matmul(weights, value.float()).to(query.dtype)


def tiny_config(**overrides) -> PeerMlaConfig:
    values = dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
        intermediate_size=64,
        product_key_dim=[8, 8],
        peer_num_heads=2,
        num_experts_per_tok=4,
        peer_query_dim=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return PeerMlaConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> PeerMlaForCausalLM:
    torch.manual_seed(seed)
    model = PeerMlaForCausalLM(tiny_config(**overrides))
    # Larger-than-default weights so that attention and retrieval are far from uniform.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.2)
    return model.eval()


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(product_key_dim=[8, 8], num_experts=100), "does not equal the product"),
        (dict(product_key_dim=[2, 2], num_experts_per_tok=5), "larger than the candidate set"),
        (
            dict(product_key_dim=[4, 4], product_key_topk=2, num_experts_per_tok=5),
            "larger than the candidate set",
        ),
        (dict(product_key_dim=[4, 4, 4], peer_query_dim=16), "divisible by the number of product-key parts"),
        (dict(product_key_dim=[]), "non-empty list"),
        (dict(peer_layers=[0, 5]), "outside 0..1"),
        (dict(mla_absorb="sometimes"), "mla_absorb"),
        (dict(attention_kernel="flash"), "attention_kernel"),
        (dict(kv_lora_rank=0), "kv_lora_rank must be a positive integer"),
        (dict(qk_rope_head_dim=7), "must be even"),
        (dict(peer_activation="tanh"), "peer_activation"),
        (dict(peer_kernel_repo="peer-kernel"), "peer_kernel_repo must be a Hub repository id 'owner/name'"),
        (dict(peer_kernel_repo="a/b/c"), "peer_kernel_repo must be a Hub repository id"),
        (dict(peer_kernel_revision="v1"), "peer_kernel_repo is not: name the kernel repository"),
        (dict(peer_kernel_repo="you/peer", peer_kernel_revision=""), "peer_kernel_revision must be a branch"),
    ],
)
def test_config_rejects_inconsistent_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_accepts_many_parts_and_round_trips(tmp_path):
    config = tiny_config(product_key_dim=[4, 3, 5], peer_query_dim=12, num_experts=60, peer_layers=[1])
    assert config.num_experts == 60
    assert config.product_key_topk == config.num_experts_per_tok
    config.save_pretrained(tmp_path)
    loaded = PeerMlaConfig.from_pretrained(tmp_path)
    assert loaded.product_key_dim == [4, 3, 5] and loaded.peer_layers == [1] and loaded.num_experts == 60
    assert loaded.is_peer_layer(1) and not loaded.is_peer_layer(0)


def test_a_config_names_its_peer_kernel_repository_and_keeps_it_through_save_and_load(tmp_path):
    assert (
        tiny_config().peer_kernel_repo is None
        and modeling.peer_kernel_layer_repository(tiny_config()) is None
    )
    config = tiny_config(peer_kernel_repo="you/peer-kernel", peer_kernel_revision="v1")
    config.save_pretrained(tmp_path)
    loaded = PeerMlaConfig.from_pretrained(tmp_path)
    assert (loaded.peer_kernel_repo, loaded.peer_kernel_revision) == ("you/peer-kernel", "v1")
    repository = modeling.peer_kernel_layer_repository(loaded)
    assert (repository._repo_id, repository._revision, repository._version) == ("you/peer-kernel", "v1", None)
    assert repository.layer_name == "PeerExperts" and repository._trust_remote_code is False
    # Without a revision: the kernel's version 1 (branch v1); trust is given to this repository only.
    unpinned = modeling.peer_kernel_layer_repository(tiny_config(peer_kernel_repo="you/peer-kernel"), True)
    assert (unpinned._revision, unpinned._version) == (None, modeling.PEER_KERNEL_VERSION)
    assert unpinned._trust_remote_code == ["you/peer-kernel"]
    with pytest.raises(ValueError, match="config.peer_kernel_repo names no kernel repository"):
        tiny_model().kernelize_peer_experts()


def test_million_expert_config_is_cheap_to_validate():
    config = tiny_config(product_key_dim=[1024, 1024], num_experts_per_tok=16, peer_query_dim=128)
    assert config.num_experts == 1024 * 1024


def test_every_parameter_and_buffer_is_initialised():
    model = PeerMlaForCausalLM(tiny_config(product_key_dim=[4, 3, 5], peer_query_dim=12, peer_layers=[1]))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor.float()).all(), name
        assert tensor.float().abs().max() < 10, name
    std = model.config.initializer_range
    for name in ("model.layers.1.mlp.router.sub_keys", "model.layers.1.mlp.experts.down_proj"):
        assert 0.5 * std < model.get_parameter(name).std() < 2 * std, name


# --- PEER retrieval -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "topk", "part_topk"),
    [
        ([8, 8], 4, None),
        ([5, 7], 6, 6),
        ([4, 3, 5], 5, None),
        ([4, 3, 5], 3, 4),
        ([16], 5, None),
        ([6, 6], 4, 6),
        ([2, 9], 4, None),
    ],
)
def test_retrieval_equals_brute_force_topk(dims, topk, part_topk):
    query_dim = 4 * len(dims)
    config = tiny_config(
        product_key_dim=dims, num_experts_per_tok=topk, product_key_topk=part_topk, peer_query_dim=query_dim
    )
    torch.manual_seed(1)
    router = PeerProductKeyRouter(config)
    torch.nn.init.normal_(router.sub_keys)
    router.eval()
    hidden = torch.randn(40, config.hidden_size)
    indices, weights = router(hidden)
    assert indices.shape == (40, config.peer_num_heads, topk)
    all_scores = router.all_expert_scores(hidden)
    assert all_scores.shape[-1] == math.prod(dims)
    best_scores, best_indices = all_scores.topk(topk, dim=-1)
    assert torch.equal(indices.sort(-1).values, best_indices.sort(-1).values)
    expected_weights = best_scores.softmax(-1)
    got = weights.gather(-1, indices.argsort(-1))
    torch.testing.assert_close(got, expected_weights.gather(-1, best_indices.argsort(-1)))
    torch.testing.assert_close(weights.sum(-1), torch.ones(40, config.peer_num_heads))


def test_retrieval_uses_batch_norm_statistics_in_training():
    config = tiny_config()
    router = PeerProductKeyRouter(config)
    assert isinstance(router.query_norm, torch.nn.BatchNorm1d)
    router.train()
    router(torch.randn(32, config.hidden_size) * 5 + 3)
    assert router.query_norm.num_batches_tracked.item() == 1
    assert router.query_norm.running_mean.abs().sum() > 0
    assert PeerProductKeyRouter(tiny_config(peer_batch_norm=False)).query_norm is None


# --- PEER experts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "identity"])
@pytest.mark.parametrize("expert_hidden_size", [1, 3])
def test_expert_sum_matches_reference_values_and_gradients(activation, expert_hidden_size):
    torch.manual_seed(0)
    config = tiny_config(peer_activation=activation, expert_hidden_size=expert_hidden_size)
    experts = PeerExperts(config).double()
    torch.nn.init.normal_(experts.down_proj)
    torch.nn.init.normal_(experts.up_proj)
    hidden = torch.randn(19, config.hidden_size, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, config.num_experts, (19, 6))
    indices[0, :3] = 5  # repeated experts must accumulate gradients
    weights = torch.rand(19, 6, dtype=torch.float64, requires_grad=True)
    out = experts(hidden, indices, weights)
    ref = peer_experts_reference(hidden, indices, weights, experts.down_proj, experts.up_proj, activation)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [hidden, weights, experts.down_proj, experts.up_proj], grad_out)
    ref_grads = torch.autograd.grad(ref, [hidden, weights, experts.down_proj, experts.up_proj], grad_out)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_expert_sum_in_bf16_follows_the_fp32_reference():
    torch.manual_seed(0)
    config = tiny_config(expert_hidden_size=2)
    experts = PeerExperts(config)
    torch.nn.init.normal_(experts.down_proj)
    torch.nn.init.normal_(experts.up_proj)
    hidden = torch.randn(9, config.hidden_size)
    indices = torch.randint(0, config.num_experts, (9, 6))
    weights = torch.rand(9, 6)
    reference = peer_experts_reference(hidden, indices, weights, experts.down_proj, experts.up_proj, "gelu")
    low = experts.to(torch.bfloat16)
    hidden_bf16 = hidden.bfloat16().requires_grad_(True)
    out = low(hidden_bf16, indices, weights.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()
    out.float().sum().backward()
    assert hidden_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(hidden_bf16.grad.float()).all()
    assert low.down_proj.grad.dtype == torch.bfloat16 and low.down_proj.grad.abs().sum() > 0


def test_expert_usage_counts_are_off_by_default_and_exact_when_on():
    model = tiny_model(peer_layers=[1])
    assert all(layer.expert_counts is None for layer in model.model.peer_layers().values())
    with pytest.raises(RuntimeError, match="track_expert_usage"):
        model.expert_usage()
    model.track_expert_usage()
    ids = torch.randint(3, 96, (3, 11))
    model(ids)
    usage = model.expert_usage()
    assert list(usage.counts) == [1]
    config = model.config
    assert usage.counts[1].sum().item() == 3 * 11 * config.peer_num_heads * config.num_experts_per_tok
    assert 0 < usage.fraction_used()[1] <= 1
    model.reset_expert_usage()
    assert model.expert_usage().counts[1].sum().item() == 0
    model.track_expert_usage(False)
    assert model.model.layers[1].mlp.expert_counts is None


# --- MLA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_absorbed_attention_equals_naive_for_prefill_and_decode(q_lora_rank):
    naive = tiny_model(q_lora_rank=q_lora_rank, mla_absorb="never")
    absorbed = tiny_model(q_lora_rank=q_lora_rank, mla_absorb="always")
    absorbed.load_state_dict(naive.state_dict())
    ids = torch.randint(3, 96, (2, 13))
    with torch.no_grad():
        prefill_naive = naive(ids[:, :9], use_cache=True)
        prefill_absorbed = absorbed(ids[:, :9], use_cache=True)
        torch.testing.assert_close(prefill_absorbed.logits, prefill_naive.logits, atol=1e-5, rtol=1e-4)
        cache_naive, cache_absorbed = prefill_naive.past_key_values, prefill_absorbed.past_key_values
        for step in range(9, 13):
            out_naive = naive(ids[:, step : step + 1], past_key_values=cache_naive, use_cache=True)
            out_absorbed = absorbed(ids[:, step : step + 1], past_key_values=cache_absorbed, use_cache=True)
            torch.testing.assert_close(out_absorbed.logits, out_naive.logits, atol=1e-5, rtol=1e-4)
        # several new tokens at once against a cache (bottom-right causal masking)
        full = naive(ids).logits
        chunked = absorbed(ids[:, 9:], past_key_values=absorbed(ids[:, :9]).past_key_values).logits
        torch.testing.assert_close(chunked, full[:, 9:], atol=1e-5, rtol=1e-4)


def test_cache_holds_the_latent_only():
    model = tiny_model()
    config = model.config
    with torch.no_grad():
        cache = model(torch.randint(3, 96, (2, 10)), use_cache=True).past_key_values
    assert cache.get_seq_length() == 10
    total = 0
    for layer in cache.layers:
        assert layer.keys.shape == (2, 1, 10, config.kv_lora_rank)
        assert layer.values.shape == (2, 1, 10, config.qk_rope_head_dim)
        total += layer.keys.numel() + layer.values.numel()
    per_token = total * 4 // (2 * 10)
    assert per_token == latent_cache_bytes_per_token(config, torch.float32)
    # DeepseekV3 caches per-head keys (nope+rope) and values for every head.
    per_head = (
        config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 4
    )
    assert per_token < per_head


def test_gpu_attention_kernels_fall_back_or_refuse_clearly_on_cpu():
    query = torch.randn(1, 2, 1, 24)
    value = torch.randn(1, 1, 3, 16)
    assert modeling.select_attention_kernel("auto", query, value, absorbed=True, masked=False) is None
    assert modeling.select_attention_kernel("sdpa", query, value, absorbed=False, masked=False) is None
    with pytest.raises(RuntimeError, match="not cuda.*FlashMLA needs kv_lora_rank=512"):
        modeling.select_attention_kernel("flash_mla", query, value, absorbed=True, masked=False)
    with pytest.raises(RuntimeError, match="flash_attn.*padding mask"):
        modeling.select_attention_kernel("flash_attn", query, value, absorbed=False, masked=True)


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """An empty per-process kernel cache and fallback log, and a `kernels.get_kernel` that records its calls."""
    import kernels

    calls = []
    outcome = {"result": RuntimeError("offline: kernels-community/flash-attn3 is not in the cache")}

    def get_kernel(repo_id, version=None, **kwargs):
        calls.append(repo_id)
        if isinstance(outcome["result"], Exception):
            raise outcome["result"]
        return outcome["result"]

    monkeypatch.setattr(modeling, "_HUB_KERNELS", {})
    monkeypatch.setattr(modeling, "_REPORTED_FALLBACKS", set())
    monkeypatch.setattr(kernels, "get_kernel", get_kernel)
    return calls, outcome


def pretend_hopper_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))


def test_auto_attention_kernels_on_a_cpu_machine_load_nothing_and_say_nothing(fresh_kernel_state, caplog):
    calls, _ = fresh_kernel_state
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only machine")
    with caplog.at_level("INFO", logger=modeling.__name__):
        model = tiny_model()
        with torch.no_grad():
            model(torch.randint(3, 96, (2, 6)))
    assert calls == [] and caplog.records == []
    assert all(layer.self_attn.attention_kernels == () for layer in model.model.layers)


def test_attention_kernels_load_when_the_model_is_built_never_in_forward(
    fresh_kernel_state, monkeypatch, caplog
):
    calls, outcome = fresh_kernel_state
    pretend_hopper_gpu(monkeypatch)
    # Offline: the load fails once, one warning names the reason, every build and forward after it uses SDPA.
    with caplog.at_level("INFO", logger=modeling.__name__):
        first, second = tiny_model(), tiny_model(seed=1)
        with torch.no_grad():
            for _ in range(3):
                first(torch.randint(3, 96, (2, 6)))
                second(torch.randint(3, 96, (1, 4)))
    assert calls == ["kernels-community/flash-attn3"]  # FlashMLA does not fit the tiny head sizes: not tried
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "offline" in warnings[0].getMessage()
    assert "falls back to SDPA" in warnings[0].getMessage()
    assert any(
        "flash_mla is not used (FlashMLA needs kv_lora_rank=512" in r.getMessage() for r in caplog.records
    )
    assert first.model.layers[0].self_attn.attention_kernels == ()

    # Loadable: the model holds it; a forward that cannot use it (CPU tensors, fp32) runs SDPA and loads nothing.
    outcome["result"] = object()
    modeling._HUB_KERNELS.clear()
    model = tiny_model()
    assert model.load_attention_kernels() == ("flash_attn",)
    assert {layer.self_attn.attention_kernels for layer in model.model.layers} == {("flash_attn",)}
    calls.clear()
    with torch.no_grad():
        model(torch.randint(3, 96, (2, 6)))
    assert calls == []


def test_an_explicit_attention_kernel_that_cannot_be_used_is_refused_when_the_model_is_built(
    fresh_kernel_state, monkeypatch
):
    if not torch.cuda.is_available():
        with pytest.raises(
            RuntimeError, match="attention_kernel='flash_attn' cannot be used: this machine has no CUDA"
        ):
            tiny_model(attention_kernel="flash_attn")
    pretend_hopper_gpu(monkeypatch)
    with pytest.raises(RuntimeError, match="'flash_mla' cannot be used: FlashMLA needs kv_lora_rank=512"):
        tiny_model(attention_kernel="flash_mla")
    with pytest.raises(RuntimeError, match="'flash_attn' cannot be used: .*flash-attn3.*offline.*'sdpa'"):
        tiny_model(attention_kernel="flash_attn")
    calls = fresh_kernel_state[0]
    calls.clear()
    model = tiny_model(attention_kernel="sdpa")
    assert calls == [] and model.model.layers[0].self_attn.attention_kernels == ()
    # Switched after the build without reloading: the forward refuses instead of loading.
    model.config.attention_kernel = "flash_attn"
    with pytest.raises(RuntimeError, match="not loaded when the model was built"):
        model(torch.randint(3, 96, (1, 4)))


class _FlashMlaSpec:
    """FlashMLA's documented dense-decode semantics in plain torch: paged bf16 cache (pages of 64 tokens), block
    table, per-sequence lengths, V = first head_dim_v columns of K, bottom-right causal mask."""

    def __init__(self):
        self.scales = []

    def get_mla_metadata(self, *args, **kwargs):
        return object(), None

    def flash_mla_with_kvcache(
        self,
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        metadata,
        num_splits=None,
        softmax_scale=None,
        causal=False,
    ):
        assert (
            k_cache.shape[1] == 64 and block_table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
        )
        assert num_splits is None
        self.scales.append(softmax_scale)
        softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        outs = []
        for b in range(q.shape[0]):
            seq_len = int(cache_seqlens[b])
            keys = k_cache[block_table[b].long()].flatten(0, 1)[:seq_len, 0]  # (t, 576)
            scores = torch.einsum("shd,td->hst", q[b].float(), keys.float()) * softmax_scale
            if causal:
                s_q = q.shape[1]
                visible = torch.ones(s_q, seq_len, dtype=torch.bool).tril(seq_len - s_q)
                scores = scores.masked_fill(~visible, float("-inf"))
            outs.append(torch.einsum("hst,tv->shv", scores.softmax(-1), keys[:, :head_dim_v].float()))
        return torch.stack(outs).to(q.dtype), None


def test_flash_mla_wrapper_pages_the_latent_cache_and_passes_the_mla_scale(monkeypatch):
    spec = _FlashMlaSpec()
    monkeypatch.setitem(modeling._HUB_KERNELS, modeling.FLASH_MLA_REPO[0], spec)
    torch.manual_seed(0)
    query = torch.randn(2, 4, 2, 576)
    key = torch.randn(2, 1, 131, 576)  # 131 tokens: three pages, the last one partial
    value = key[..., :512]
    scale = 192**-0.5
    out = modeling.flash_mla_attention(query, key, value, scale)
    expected = _causal_attention(query, key, value, None, scale)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert spec.scales == [scale]


def test_flash_attn_wrapper_uses_the_flash_layout_and_scale(monkeypatch):
    calls = []

    class FlashAttnSpec:  # flash-attn 3's flash_attn_func: (b, s, h, d) tensors, bottom-right causal mask
        @staticmethod
        def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
            calls.append((q.shape, softmax_scale, causal))
            out = _causal_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, softmax_scale
            )
            return out.transpose(1, 2), None  # some builds also return the log-sum-exp

    monkeypatch.setitem(modeling._HUB_KERNELS, modeling.FLASH_ATTN_REPO[0], FlashAttnSpec())
    query, key = torch.randn(2, 4, 3, 24), torch.randn(2, 4, 7, 24)
    value = torch.randn(2, 4, 7, 16)
    out = modeling.flash_attn_attention(query, key, value, 0.3)
    torch.testing.assert_close(out, _causal_attention(query, key, value, None, 0.3))
    assert calls == [(torch.Size([2, 3, 4, 24]), 0.3, True)]


# --- generation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mla_absorb", ["auto", "never"])
def test_generate_with_cache_equals_without(mla_absorb):
    model = tiny_model(mla_absorb=mla_absorb)
    ids = torch.randint(3, 96, (2, 7))
    kwargs = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with_cache = model.generate(
        ids, use_cache=True, output_scores=True, return_dict_in_generate=True, **kwargs
    )
    without = model.generate(ids, use_cache=False, output_scores=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(with_cache.sequences, without.sequences)
    assert len(set(with_cache.sequences[0, 7:].tolist())) > 1  # not a degenerate repetition
    for a, b in zip(with_cache.scores, without.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_generates_like_each_sequence_alone():
    model = tiny_model()
    short = torch.randint(3, 96, (1, 4))
    long = torch.randint(3, 96, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, 9:]
    alone_short = model.generate(short, attention_mask=torch.ones_like(short), **kwargs)[:, 4:]
    alone_long = model.generate(long, attention_mask=torch.ones_like(long), **kwargs)[:, 9:]
    assert torch.equal(together[0], alone_short[0])
    assert torch.equal(together[1], alone_long[0])


# --- training and persistence -------------------------------------------------------------------------------


def test_training_steps_reduce_loss_and_reach_every_parameter():
    model = tiny_model(seed=3, peer_layers=[0]).train()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.1)
    ids = torch.randint(3, 96, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        if first is None:
            first = loss.item()
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient reaches {missing}"
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_save_and_load_keep_weights_and_batch_norm_statistics(tmp_path):
    model = tiny_model(peer_layers="all").train()
    model(torch.randint(3, 96, (4, 12)))  # moves BatchNorm running statistics
    model.eval()
    ids = torch.randint(3, 96, (2, 8))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = PeerMlaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    stats = loaded.model.layers[0].mlp.router.query_norm
    assert stats.num_batches_tracked.item() == 1


def test_bf16_forward_is_close_to_fp32():
    model = tiny_model()
    ids = torch.randint(3, 96, (4, 16))
    with torch.no_grad():
        reference = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits.float()
    # bf16 can flip near-tied expert choices, so compare on average, not elementwise.
    assert (low - reference).abs().mean() < 0.05 * reference.abs().mean()
    assert (low.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(peer_batch_norm=False).train()
    ids = torch.randint(3, 96, (2, 12))
    model(ids, labels=ids).loss.backward()
    expected = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)
