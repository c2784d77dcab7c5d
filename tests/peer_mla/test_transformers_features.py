"""PEER-MLA as a transformers model: attention through the registry (eager weights, sdpa, flex), masks from the
mask utilities (4-D, packed sequences, static cache), RoPE scaling, output flags, compile and export, and the query
BatchNorm under any batch shape."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hfx.peer_mla import modeling_peer_mla as modeling
from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM, PeerQueryBatchNorm, attention_path
from tests.peer_mla.test_modeling import tiny_config, tiny_model


def with_attention(model: PeerMlaForCausalLM, implementation: str) -> PeerMlaForCausalLM:
    other = copy.deepcopy(model)
    other.set_attn_implementation(implementation)
    return other


# --- attention through transformers' registry ---------------------------------------------------------------


@pytest.mark.parametrize("mla_absorb", ["never", "always"])
def test_eager_attention_returns_weights_that_sum_to_one_and_matches_sdpa(mla_absorb):
    sdpa = tiny_model(mla_absorb=mla_absorb)
    eager = with_attention(sdpa, "eager")
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        out = eager(ids, output_attentions=True)
        reference = sdpa(ids)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-4)
    assert len(out.attentions) == sdpa.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (2, sdpa.config.num_attention_heads, 9, 9)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, sdpa.config.num_attention_heads, 9))
        assert torch.all(weights.triu(1) == 0)  # causal: nothing attends to a later token


def test_decode_steps_take_the_latent_path_and_prefill_the_naive_one():
    config = tiny_config()
    assert attention_path(config, 1, 10, training=False) == "absorbed"
    assert attention_path(config, 10, 10, training=False) == "naive"
    assert attention_path(config, 1, 10, training=True) == "naive"
    flex = copy.deepcopy(config)
    flex._attn_implementation = "flex_attention"
    assert attention_path(flex, 1, 10, training=False) == "naive"
    flex.mla_absorb = "always"
    with pytest.raises(ValueError, match="mla_absorb='always' needs attn_implementation 'sdpa' or 'eager'"):
        attention_path(flex, 1, 10, training=False)


def test_eager_decode_returns_the_weights_of_each_step():
    model = with_attention(tiny_model(), "eager")
    ids = torch.randint(3, 96, (2, 6))
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True
        )
    assert len(out.attentions) == 3  # one tuple of layers per generated token
    assert out.attentions[0][0].shape[-2:] == (6, 6)
    step = out.attentions[2][0]
    assert step.shape == (2, model.config.num_attention_heads, 1, 8)
    torch.testing.assert_close(step.sum(-1), torch.ones_like(step.sum(-1)))


@pytest.mark.skipif(not hasattr(torch.nn.attention, "flex_attention"), reason="no flex attention")
def test_flex_attention_matches_sdpa():
    sdpa = tiny_model()
    flex = with_attention(sdpa, "flex_attention")
    ids = torch.randint(3, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(flex(ids).logits, sdpa(ids).logits, atol=1e-4, rtol=1e-4)


# --- masks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_packed_position_ids_attend_within_each_sequence_only(training):
    model = tiny_model(peer_layers=None).train(
        training
    )  # dense MLPs: BatchNorm statistics would mix the rows
    first, second = torch.randint(3, 96, (1, 5)), torch.randint(3, 96, (1, 7))
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    for kwargs in ({}, {"use_cache": False}):  # TRL's padding-free batches pass no use_cache
        with torch.no_grad():
            together = model(packed, position_ids=position_ids, **kwargs).logits
            alone = torch.cat([model(first, **kwargs).logits, model(second, **kwargs).logits], dim=1)
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_a_4d_mask_equals_the_2d_padding_mask_it_spells_out():
    model = tiny_model()
    ids = torch.randint(3, 96, (2, 7))
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[1, :3] = 0  # left padding
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    four_d = causal[None, None] & padding.bool()[:, None, None, :]
    four_d = four_d | ~four_d.any(-1, keepdim=True)  # fully masked rows see everything, as transformers does
    position_ids = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(ids, attention_mask=padding, position_ids=position_ids).logits
        got = model(ids, attention_mask=four_d, position_ids=position_ids).logits
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mla_absorb", ["auto", "never"])
def test_static_cache_generation_equals_dynamic(mla_absorb):
    model = tiny_model(mla_absorb=mla_absorb)
    ids = torch.randint(3, 96, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        static = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static"
        )
    assert torch.equal(static, dynamic)


# --- RoPE, outputs ---------------------------------------------------------------------------------------------


def test_linear_rope_scaling_is_positions_divided_by_the_factor():
    plain = tiny_model()
    scaled_config = tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0})
    assert scaled_config.rope_parameters["rope_theta"] == plain.config.rope_parameters["rope_theta"]
    scaled = PeerMlaForCausalLM(scaled_config).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 96, (1, 6))
    positions = torch.arange(0, 12, 2)[None]
    # An explicit mask: without one, positions that do not step by 1 read as packed sequences.
    mask = torch.ones_like(ids)
    with torch.no_grad():
        scaled_logits = scaled(ids, attention_mask=mask, position_ids=positions).logits
        expected = plain(ids, attention_mask=mask, position_ids=positions // 2).logits
        torch.testing.assert_close(scaled_logits, expected, atol=1e-5, rtol=1e-4)
        unscaled = plain(ids, attention_mask=mask, position_ids=positions).logits
    assert not torch.allclose(unscaled, scaled_logits)


def test_config_output_flags_and_return_dict_false():
    config = tiny_config(output_hidden_states=True, output_attentions=True)
    config._attn_implementation = "eager"
    model = PeerMlaForCausalLM(config).eval()
    ids = torch.randint(3, 96, (2, 5))
    with torch.no_grad():
        out = model(ids)
        assert len(out.hidden_states) == config.num_hidden_layers + 1
        assert len(out.attentions) == config.num_hidden_layers
        as_tuple = model(ids, return_dict=False, output_hidden_states=False, output_attentions=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.logits)


def test_logits_to_keep_takes_the_last_positions_or_given_ones():
    model = tiny_model()
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=2).logits, full[:, -2:])
        torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]])


# --- compile and export -----------------------------------------------------------------------------------------


def test_a_decode_step_compiles_with_fullgraph():
    model = tiny_model()
    ids = torch.randint(3, 96, (2, 6))
    with torch.no_grad():
        prefill = model(ids, use_cache=True)
        next_ids = prefill.logits[:, -1:].argmax(-1)
        expected = model(next_ids, past_key_values=copy.deepcopy(prefill.past_key_values)).logits
        torch._dynamo.reset()
        step = torch.compile(model, fullgraph=True, backend="eager")
        got = step(next_ids, past_key_values=copy.deepcopy(prefill.past_key_values)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_the_model_exports_and_the_exported_program_gives_the_same_logits():
    model = tiny_model()
    ids = torch.randint(3, 96, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        program = torch.export.export(
            model,
            args=(),
            kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False},
            strict=False,
        )
        got = program.module()(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_compiled_peer_layers_run_the_gather_form_and_eager_the_sparse_one(monkeypatch):
    model = tiny_model(peer_layers="all")
    ids = torch.randint(3, 96, (2, 5))
    calls = []
    reference = modeling.peer_experts_reference

    def counting_reference(*args):
        calls.append("gather")
        return reference(*args)

    monkeypatch.setattr(modeling, "peer_experts_reference", counting_reference)
    with torch.no_grad():
        eager = model(ids).logits
        assert calls == []
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")(ids).logits
    assert calls  # traced through the gather form
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


# --- the query BatchNorm ------------------------------------------------------------------------------------------


def test_batch_norm_on_a_single_token_in_training_uses_the_running_statistics():
    norm = PeerQueryBatchNorm(6)
    norm.running_mean.fill_(1.0)
    norm.running_var.fill_(4.0)
    norm.train()
    x = torch.randn(1, 6)
    out = norm(x)
    torch.testing.assert_close(out, (x - 1.0) / torch.sqrt(torch.tensor(4.0) + norm.eps))
    assert norm.num_batches_tracked.item() == 0 and torch.all(norm.running_mean == 1.0)
    model = tiny_model(peer_layers="all").train()
    model(torch.randint(3, 96, (1, 1)))  # one token in training: no error


def test_batch_norm_leaves_padding_out_of_its_statistics():
    norm, reference = PeerQueryBatchNorm(4), torch.nn.BatchNorm1d(4)
    norm.train(), reference.train()
    x = torch.randn(10, 4) * 3 + 2
    token_mask = torch.tensor([True] * 7 + [False] * 3)
    garbage = x.clone()
    garbage[~token_mask] = 1e4  # padding rows, whatever they hold
    out = norm(garbage, token_mask)
    expected = reference(x[token_mask])
    torch.testing.assert_close(out[token_mask], expected)
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    torch.testing.assert_close(norm.running_var, reference.running_var)
    # Through the model: padding at the end of a row changes neither the real tokens' outputs nor the statistics.
    model = tiny_model(peer_layers="all").train()
    other = copy.deepcopy(model)
    ids = torch.randint(3, 96, (2, 6))
    padded = torch.cat([ids, torch.full((2, 3), 5)], dim=1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1).long()
    torch.testing.assert_close(
        model(padded, attention_mask=mask).logits[:, :6], other(ids).logits, atol=1e-5, rtol=1e-4
    )
    for a, b in zip(model.model.peer_layers().values(), other.model.peer_layers().values(), strict=True):
        torch.testing.assert_close(a.router.query_norm.running_mean, b.router.query_norm.running_mean)


def test_gradient_checkpointing_updates_the_running_statistics_once_per_forward(caplog):
    plain = tiny_model(peer_layers="all").train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    ids = torch.randint(3, 96, (2, 8))
    for model in (plain, checkpointed):
        model(ids, labels=ids).loss.backward()
    for a, b in zip(
        plain.model.peer_layers().values(), checkpointed.model.peer_layers().values(), strict=True
    ):
        assert b.router.query_norm.num_batches_tracked.item() == 1
        torch.testing.assert_close(a.router.query_norm.running_mean, b.router.query_norm.running_mean)
        torch.testing.assert_close(a.router.query_norm.running_var, b.router.query_norm.running_var)
    reentrant = copy.deepcopy(plain)
    with caplog.at_level(logging.WARNING):
        reentrant.gradient_checkpointing_enable({"use_reentrant": True})
    assert "updated twice" in caplog.text


def test_batch_norm_without_padding_is_one_fused_kernel_with_the_same_result():
    """No token_mask (packed pretraining blocks): PyTorch's fused batch norm, with the same outputs, gradients and
    running statistics as the masked path with every token real, in a handful of kernels instead of ~30 (launches a
    GPU pays for one by one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(12, 6) * 3 + 1
    results = {}
    for name, mask in (("fused", None), ("masked", torch.ones(12, dtype=torch.bool))):
        norm = PeerQueryBatchNorm(6).train()
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
            norm.bias.copy_(torch.linspace(-1.0, 1.0, 6))
        inputs = x.clone().requires_grad_(True)
        with CountOps() as counter:
            out = norm(inputs, mask)
        (out * torch.arange(6.0)).sum().backward()
        results[name] = (out.detach(), inputs.grad, norm.running_mean, norm.running_var, counter.count)
        assert norm.num_batches_tracked.item() == 1
    for fused, masked in zip(results["fused"][:4], results["masked"][:4], strict=True):
        torch.testing.assert_close(fused, masked, atol=1e-5, rtol=1e-5)
    assert results["fused"][4] <= 4 and results["masked"][4] >= 20, (
        results["fused"][4],
        results["masked"][4],
    )
