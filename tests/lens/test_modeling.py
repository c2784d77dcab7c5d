"""Consistency Lens model on tiny backbones: Gumbel straight-through gradients, activation hooks, weight copy,
config validation, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hfx.lens.activations import (
    decoder_layers,
    next_token_logits,
    patched_next_token_logits,
    replace_activations,
)
from hfx.lens.configuration_lens import ConsistencyLensConfig
from hfx.lens.data import capture_batch
from hfx.lens.modeling_lens import ConsistencyLens
from hfx.losses import entropy, kl_divergence

VOCAB = 61


def tiny_base(seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def test_from_base_copies_truncated_weights():
    base = tiny_base()
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=3, decoder_num_layers=2, encoder_num_layers=1
    )
    assert len(decoder_layers(lens.decoder)) == 2 and len(lens.encoder.layers) == 1
    torch.testing.assert_close(
        lens.decoder.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight
    )
    torch.testing.assert_close(
        lens.encoder.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    )
    torch.testing.assert_close(lens.encoder.embed_tokens.weight, base.model.embed_tokens.weight)
    assert lens.config.activation_dim == 24 and lens.config.layer == 1


def test_gumbel_straight_through_gradients_reach_the_decoder():
    base = tiny_base()
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=4, decoder_num_layers=1, encoder_num_layers=1, read_token=True
    )
    torch.manual_seed(0)
    activations = torch.randn(5, 24)
    out = lens(activations, temperature=1.0)
    assert out.explanation_ids.shape == (5, 4) and out.reconstruction.shape == (5, 24)
    # hard one-hot rows in the forward pass
    assert torch.equal(out.explanation.sum(-1), torch.ones(5, 4))
    assert set(out.explanation.unique().tolist()) <= {0.0, 1.0}
    torch.nn.functional.mse_loss(out.reconstruction, activations).backward()
    for name in (
        "activation_in.weight",
        "decoder.model.layers.0.mlp.down_proj.weight",
        "decoder.lm_head.weight",
    ):
        grad = lens.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert lens.activation_out.weight.grad.abs().sum() > 0 and lens.read_embedding.grad.abs().sum() > 0


def layer_inputs(model, input_ids):
    """The hidden states entering each decoder layer (what the previous layer really output, hooks included),
    and the logits."""
    seen = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen.__setitem__(
                i, (args[0] if args else kwargs["hidden_states"]).detach()
            ),
            with_kwargs=True,
        )
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        logits = model(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in range(len(seen))], logits


def test_hook_replaces_exactly_the_chosen_layer_and_position():
    base = tiny_base()
    input_ids = torch.randint(0, VOCAB, (2, 7))
    positions = torch.tensor([2, 5])
    with torch.no_grad():
        clean, clean_logits = layer_inputs(base, input_ids)
        reference = base(input_ids, output_hidden_states=True).hidden_states
    # reading the activation at a position = the last token of the row cut after it
    captured = capture_batch(
        base, 1, [input_ids[r, : p + 1].tolist() for r, p in enumerate(positions.tolist())], 5
    )
    torch.testing.assert_close(
        captured["activation"], reference[2][torch.arange(2), positions], rtol=1e-4, atol=1e-5
    )

    values = torch.randn(2, 24)
    with torch.no_grad(), replace_activations(base, 1, positions, values):
        patched, patched_logits = layer_inputs(base, input_ids)
    torch.testing.assert_close(patched[0], clean[0])
    torch.testing.assert_close(patched[1], clean[1])  # layer 0's output: untouched
    torch.testing.assert_close(
        patched[2][torch.arange(2), positions], values
    )  # layer 1's output at the positions
    for row, position in enumerate(positions.tolist()):
        others = [p for p in range(7) if p != position]
        torch.testing.assert_close(patched[2][row, others], clean[2][row, others])
        # earlier positions never see the patch; the patched one and later ones do
        torch.testing.assert_close(patched_logits[row, :position], clean_logits[row, :position])
        assert not torch.allclose(patched_logits[row, position:], clean_logits[row, position:])

    trainable = values.clone().requires_grad_(True)
    with replace_activations(base, 1, positions, trainable):
        base(input_ids).logits.sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    with torch.no_grad():  # the hook is gone after the block
        torch.testing.assert_close(base(input_ids).logits, clean_logits)


def test_out_of_range_layers_are_clear_errors():
    base = tiny_base()
    with pytest.raises(
        ValueError, match=r"layer 3 is out of range: LlamaForCausalLM has decoder layers 0\.\.2"
    ):
        with replace_activations(base, 3, torch.tensor([0]), torch.zeros(1, 24)):
            pass
    with pytest.raises(ValueError, match=r"layer=5 is outside the base model's decoder layers \(0\.\.2\)"):
        ConsistencyLens.from_base(base, layer=5)
    with pytest.raises(ValueError, match="decoder_num_layers=4 must be between 1 and 3"):
        ConsistencyLensConfig(backbone_config=base.config, layer=0, decoder_num_layers=4)
    with pytest.raises(ValueError, match="encoder_output_layer=3 is outside"):
        ConsistencyLensConfig(
            backbone_config=base.config, layer=0, encoder_num_layers=2, encoder_output_layer=3
        )


def test_save_and_load_round_trip(tmp_path):
    base = tiny_base()
    lens = ConsistencyLens.from_base(
        base, layer=2, explanation_length=3, decoder_num_layers=1, encoder_num_layers=2
    )
    lens.eval()
    explanation = torch.nn.functional.one_hot(torch.randint(0, VOCAB, (3, 3)), VOCAB).float()
    activations = torch.randn(3, 24)
    with torch.no_grad():
        expected = lens.reconstruct(explanation)
        torch.manual_seed(1)
        expected_ids = lens.explain(activations).explanation_ids
    lens.save_pretrained(tmp_path)
    assert {"configuration_lens.py", "modeling_lens.py", "model.safetensors"} <= {
        p.name for p in tmp_path.iterdir()
    }
    for loaded in (
        ConsistencyLens.from_pretrained(tmp_path),
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        loaded.eval()
        assert loaded.config.layer == 2 and loaded.config.encoder_num_layers == 2
        with torch.no_grad():
            torch.testing.assert_close(loaded.reconstruct(explanation), expected)
            torch.manual_seed(1)
            assert torch.equal(loaded.explain(activations).explanation_ids, expected_ids)


def test_a_lens_of_a_bfloat16_base_loads_wholly_in_the_dtype_asked(tmp_path):
    # A base loaded in bf16 records its dtype in its config; the lens's decoder and encoder must not inherit it.
    tiny_base().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=2, decoder_num_layers=1, encoder_num_layers=1
    )
    assert {p.dtype for p in lens.parameters()} == {torch.bfloat16}
    lens.save_pretrained(tmp_path / "lens")
    for dtype in (torch.float32, torch.bfloat16):
        loaded = ConsistencyLens.from_pretrained(tmp_path / "lens", dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert {p.dtype for p in ConsistencyLens.from_pretrained(tmp_path / "lens").parameters()} == {
        torch.bfloat16
    }


def test_kl_and_entropy():
    logits = torch.randn(4, 9)
    assert kl_divergence(logits, logits).abs() < 1e-6
    other = torch.randn(4, 9)
    p, q = logits.softmax(-1), other.softmax(-1)
    torch.testing.assert_close(kl_divergence(logits, other), (p * (p.log() - q.log())).sum(-1).mean())
    torch.testing.assert_close(entropy(torch.zeros(2, 8)), torch.log(torch.tensor(8.0)))


def test_from_base_can_start_at_the_mean_with_a_scaled_identity_input():
    base = tiny_base()
    mean = torch.randn(24)
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=2, mean_activation=mean, activation_norm=4.0
    )
    embedding_norm = lens.decoder.get_input_embeddings().weight.norm(dim=-1).mean()
    torch.testing.assert_close(lens.activation_in.weight, torch.eye(24) * embedding_norm / 4.0)
    with torch.no_grad():
        out = lens(torch.randn(3, 24))
    torch.testing.assert_close(out.reconstruction, mean.expand(3, 24))


def test_identity_readout_of_the_preceding_text_is_the_base_activation():
    # Encoder = the base's first layer + 1 layers, read before any final norm, identity output: reading the text
    # that precedes a position gives exactly the activation the base model computes from that text.
    base = tiny_base(layers=3)
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=5, decoder_num_layers=1, encoder_num_layers=2, identity_output=True
    ).eval()
    tokens = torch.randint(0, VOCAB, (4, 5))
    expected = capture_batch(base, 1, tokens.tolist(), topk=2)["activation"]
    with torch.no_grad():
        got = lens.reconstruct(torch.nn.functional.one_hot(tokens, VOCAB).float())
    torch.testing.assert_close(got, expected)
    # reading an earlier layer's output is a different (still un-normed) state
    lens.config.encoder_output_layer = 1
    with torch.no_grad():
        earlier = lens.reconstruct(torch.nn.functional.one_hot(tokens, VOCAB).float())
    torch.testing.assert_close(earlier, capture_batch(base, 0, tokens.tolist(), topk=2)["activation"])


@pytest.mark.parametrize("write_backwards", [False, True])
def test_context_loss_teaches_the_decoder_to_write_the_preceding_tokens(write_backwards):
    base = tiny_base()
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=3, decoder_num_layers=1, write_backwards=write_backwards
    )
    torch.manual_seed(0)
    activations = torch.randn(8, 24)
    targets = torch.randint(0, VOCAB, (8, 3))
    targets[0, 0] = -100  # a row shorter than the explanation
    optimizer = torch.optim.Adam(lens.parameters(), lr=1e-2)
    first, _ = lens.context_loss(activations, targets)
    for _ in range(60):
        loss, accuracy = lens.context_loss(activations, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < first / 4 and accuracy == 1.0
    with torch.no_grad():
        written = lens.explain(activations, sample=False).explanation_ids
    # what it was taught is what it writes, in reading order either way
    assert torch.equal(written[1:], targets[1:])
    if write_backwards:  # written last token first: the decoder's first step is the position's own token
        with torch.no_grad():
            first_step = lens.decoder(inputs_embeds=lens.activation_in(activations)[:, None]).logits[:, -1]
        assert torch.equal(first_step.argmax(-1), targets[:, -1])
    with pytest.raises(ValueError, match="context targets have 2 tokens, the lens writes 3"):
        lens.context_loss(activations, targets[:, :2])


def test_patched_next_token_logits_match_a_full_patched_forward():
    base = tiny_base()
    rows = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 3, 1, 4)]
    values = torch.randn(4, 24, requires_grad=True)
    got = patched_next_token_logits(base, 1, rows, values)
    got.sum().backward()
    assert values.grad.abs().sum() > 0
    for row, ids in enumerate(rows):
        with (
            torch.no_grad(),
            replace_activations(base, 1, torch.tensor([len(ids) - 1]), values[row : row + 1]),
        ):
            expected = base(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)
    # several replacements over one prefix: each equals its own full forward
    with torch.no_grad():
        several = next_token_logits(base, 1, rows, {"own": None, "patched": values, "doubled": 2 * values})
    for row, ids in enumerate(rows):
        with torch.no_grad():
            own = base(input_ids=torch.tensor([ids])).logits[0, -1]
            with replace_activations(base, 1, torch.tensor([len(ids) - 1]), 2 * values[row : row + 1]):
                doubled = base(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(several["own"][row], own, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(several["patched"][row], got[row].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(several["doubled"][row], doubled, atol=1e-5, rtol=1e-5)


LOAD_WITHOUT_HFX = """
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModel

lens = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
expected = load_file(sys.argv[2])
with torch.no_grad():
    reconstruction = lens.reconstruct(expected["explanation"])
    ids = lens.explain(expected["activations"], sample=False).explanation_ids
print(json.dumps({
    "model_class": type(lens).__module__,
    "hfx_loaded": "hfx" in sys.modules,
    "max_abs_diff": float((reconstruction - expected["reconstruction"]).abs().max()),
    "same_explanations": bool(torch.equal(ids, expected["explanation_ids"])),
}))
"""


def test_saved_lens_loads_with_trust_remote_code_without_hfx(tmp_path):
    from safetensors.torch import save_file

    from tests.isolated import run_without_hfx

    lens = ConsistencyLens.from_base(
        tiny_base(), layer=1, explanation_length=3, decoder_num_layers=1, read_token=True
    ).eval()
    lens.save_pretrained(tmp_path / "lens")
    explanation = torch.nn.functional.one_hot(torch.randint(0, VOCAB, (2, 3)), VOCAB).float()
    activations = torch.randn(2, 24)
    with torch.no_grad():
        expected = {
            "explanation": explanation,
            "activations": activations,
            "reconstruction": lens.reconstruct(explanation),
            "explanation_ids": lens.explain(activations, sample=False).explanation_ids,
        }
    save_file(expected, tmp_path / "expected.safetensors")
    report = run_without_hfx(
        LOAD_WITHOUT_HFX, [tmp_path / "lens", tmp_path / "expected.safetensors"], tmp_path
    )
    assert report["model_class"].startswith("transformers_modules.") and not report["hfx_loaded"]
    assert report["max_abs_diff"] < 1e-5 and report["same_explanations"]


def test_weights_missing_from_a_checkpoint_are_initialized_and_the_loaded_ones_kept(tmp_path):
    from safetensors.torch import load_file, save_file

    lens = ConsistencyLens.from_base(
        tiny_base(),
        layer=1,
        explanation_length=3,
        decoder_num_layers=1,
        encoder_num_layers=1,
        read_token=True,
    )
    with torch.no_grad():
        lens.read_embedding.fill_(0.5)
    lens.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = {"activation_out.weight", "activation_out.bias"}
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        tmp_path / "model.safetensors",
        {"format": "pt"},
    )
    loaded = ConsistencyLens.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.read_embedding, torch.full_like(loaded.read_embedding, 0.5))
    torch.testing.assert_close(loaded.activation_in.weight, lens.activation_in.weight)
    std = loaded.activation_out.weight.std().item()
    assert 0.3 * loaded.config.initializer_range < std < 3 * loaded.config.initializer_range
    assert torch.all(loaded.activation_out.bias == 0)


@pytest.mark.parametrize("read_token", [False, True])
def test_a_greedy_explanation_is_what_the_decoder_generates_from_the_activation(read_token):
    lens = ConsistencyLens.from_base(
        tiny_base(),
        layer=1,
        explanation_length=5,
        decoder_num_layers=2,
        encoder_num_layers=1,
        read_token=read_token,
    ).eval()
    activations = torch.randn(3, 24) * 3
    with torch.no_grad():
        ids = lens.explain(activations, sample=False).explanation_ids
        first = lens.activation_in(activations)[:, None]
        generated = lens.decoder.generate(
            inputs_embeds=first,
            attention_mask=torch.ones(3, 1, dtype=torch.long),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=None,  # a lens writes all its tokens; explain has no end-of-sequence
            pad_token_id=0,
        )
    assert torch.equal(ids, generated[:, -5:])
