"""Per-token gradients: batched == one at a time, Conv1D and biases, projection within the JL bound, selection
errors, and the block similarity matrix."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hfx.quanta.gradients import PerTokenGradients, reference_gradients, select_layers
from hfx.quanta.similarity import GRADIENTS_STAGE, GradientConfig, compute_gradients, similarity_matrix
from hfx.stages import Stage

VOCAB = 97


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2
    )
    return GPT2LMHeadModel(config).eval()


def samples(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    contexts, targets = [], []
    for _ in range(n):
        length = int(torch.randint(1, 20, (1,), generator=generator))
        contexts.append(torch.randint(0, VOCAB, (length,), generator=generator).tolist())
        targets.append(int(torch.randint(0, VOCAB, (1,), generator=generator)))
    return contexts, targets


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d-bias"])
def test_batched_exact_gradients_equal_one_at_a_time(make_model):
    model = make_model()
    contexts, targets = samples(7)
    batched = PerTokenGradients(model, projection_dim=0)(contexts, targets)
    reference = reference_gradients(model, contexts, targets)
    assert batched.shape == reference.shape
    relative = (batched - reference).norm(dim=1) / reference.norm(dim=1)
    assert relative.max() < 1e-5, relative


def test_default_selection_excludes_embeddings_norms_and_head():
    model = tiny_llama()
    layers = select_layers(model)
    assert len(layers) == 2 * 7
    assert all(isinstance(m, torch.nn.Linear) for m in layers.values())
    assert "lm_head" not in layers


def test_selection_errors_name_the_problem():
    model = tiny_llama()
    with pytest.raises(
        ValueError, match=r"no parameters matching pattern 'experts'.*look like: \['model.layers.0"
    ):
        select_layers(model, "experts")
    with pytest.raises(ValueError, match=r"selects model.layers.0.input_layernorm \(LlamaRMSNorm\)"):
        select_layers(model, r"layers\.0\.input_layernorm")
    assert list(select_layers(model, r"mlp\.down_proj")) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_projected_similarity_is_within_the_johnson_lindenstrauss_bound():
    model = tiny_llama(seed=1)
    contexts, targets = samples(12, seed=1)
    exact = reference_gradients(model, contexts, targets)
    norms = exact.norm(dim=1, keepdim=True)
    unit = exact / norms
    m = 256
    projector = PerTokenGradients(model, projection_dim=m, seed=3)
    projected = projector(contexts, targets) / norms  # the sketch is linear: S(g / |g|) = S(g) / |g|
    width = projector.spec.width
    assert width == 14 * m < exact.shape[1]
    # JL: a dense Gaussian projection to `width` dims moves all n^2 inner products of unit vectors by at most
    # eps with probability >= 1 - delta; the sketch (fixed seed) stays inside that bound too.
    n, delta = len(targets), 0.01
    eps = math.sqrt(8 * math.log(4 * n * n / delta) / width)
    error = (projected @ projected.t() - unit @ unit.t()).abs()
    assert error.max() <= eps, (error.max().item(), eps)
    assert error.max() > 1e-4  # a sketch, not a copy
    cosine = torch.nn.functional.normalize(projected, dim=1)
    assert (cosine @ cosine.t() - unit @ unit.t()).abs().mean() < eps / 3
    # the same seed gives the same sketch; another seed another one
    again = PerTokenGradients(model, projection_dim=m, seed=3)(contexts, targets) / norms
    torch.testing.assert_close(again, projected)
    other = PerTokenGradients(model, projection_dim=m, seed=4)(contexts, targets) / norms
    assert not torch.allclose(other, projected)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_the_sketch_of_each_layer_is_its_projected_exact_gradient(make):
    """Layers of one shape are sketched together; every layer's part of the row is still R G S^T's diagonal over
    sqrt(m) for its own G (and R b for its bias), in the layers' order."""
    model = make(seed=2)
    contexts, targets = samples(5, seed=2)
    m = 16
    projector = PerTokenGradients(model, projection_dim=m, seed=1)
    sketched = projector(contexts, targets)
    exact = PerTokenGradients(model, projection_dim=0)(contexts, targets)
    expected, offset = [], 0
    for name, module in projector.layers.items():
        r_out, r_in = projector.projections[name]
        fan_out, fan_in = r_out.shape[1], r_in.shape[1]
        gradient = exact[:, offset : offset + fan_out * fan_in].reshape(-1, fan_out, fan_in)
        offset += fan_out * fan_in
        expected.append(torch.einsum("jo,boi,ji->bj", r_out, gradient, r_in) / math.sqrt(m))
        if getattr(module, "bias", None) is not None:
            expected.append(exact[:, offset : offset + fan_out] @ r_out.t() / math.sqrt(m))
            offset += fan_out
    assert offset == exact.shape[1]
    torch.testing.assert_close(sketched, torch.cat(expected, dim=1), rtol=1e-4, atol=1e-5)
    # the shapes do repeat: some layers share a stack of projections
    assert len({tuple(projector.projections[n][1].shape) for n in projector.layers}) < len(projector.layers)


def test_gradient_shards_resume_and_similarity_blocks_equal_the_full_product(tmp_path):
    import datasets

    from hfx.quanta.filters import FEATURES

    model = tiny_llama()
    contexts, targets = samples(11)
    rows = [
        {
            "token_index": 100 + i,
            "window_id": i,
            "doc_id": 0,
            "position": len(c),
            "token_id": t,
            "token": str(t),
            "context": "",
            "context_ids": c,
            "loss_bits": 0.01,
        }
        for i, (c, t) in enumerate(zip(contexts, targets, strict=True))
    ]
    tokens = datasets.Dataset.from_list(rows, features=FEATURES)
    config = GradientConfig(projection_dim=4, seed=0, batch_size=3, tokens_per_shard=4)
    out = compute_gradients(model, tokens, tmp_path, config, {"model": "tiny"})
    shards = sorted(out.glob("gradients-*.safetensors"))
    assert len(shards) == 3
    first = shards[1].read_bytes()
    shards[1].unlink()  # as if killed before the second shard was written
    compute_gradients(model, tokens, tmp_path, config, {"model": "tiny"})
    assert shards[1].read_bytes() == first
    with pytest.raises(ValueError, match=r"other settings:\n  settings.projection_dim: 4 -> 8"):
        compute_gradients(model, tokens, tmp_path, GradientConfig(8, 0, None, 3, 4), {"model": "tiny"})
    # Re-filtered to as many tokens, but other ones: the shards of the first set are not theirs, so the stage is
    # computed again (its input changed upstream), and again for the first set.
    from safetensors.torch import load_file

    other = tokens.map(lambda row: {"token_index": row["token_index"] + 1000})
    compute_gradients(model, other, tmp_path, config, {"model": "tiny"})
    assert load_file(shards[0])["token_index"].tolist() == [1100, 1101, 1102, 1103]
    compute_gradients(model, tokens, tmp_path, config, {"model": "tiny"})

    gradients = torch.cat([load_file(p)["gradients"] for p in shards])
    torch.testing.assert_close(gradients.norm(dim=1), torch.ones(11))
    direct = PerTokenGradients(model, 4, 0)(contexts, targets)
    torch.testing.assert_close(gradients, torch.nn.functional.normalize(direct, dim=1), rtol=1e-4, atol=1e-5)
    path = similarity_matrix(tmp_path)
    result = load_file(path)
    assert result["token_index"].tolist() == list(range(100, 111))
    torch.testing.assert_close(result["similarity"], (gradients @ gradients.t()).clamp(-1, 1))
    # the similarity is a stage: reused for the same gradients, made again from new ones, refused from unfinished
    made = path.stat().st_mtime_ns
    assert similarity_matrix(tmp_path) == path and path.stat().st_mtime_ns == made
    compute_gradients(model, other, tmp_path, config, {"model": "tiny"})
    assert load_file(similarity_matrix(tmp_path))["token_index"].tolist() == list(range(1100, 1111))
    Stage.recorded(tmp_path / "gradients", GRADIENTS_STAGE).reopen()
    with pytest.raises(FileNotFoundError, match="gradients are not finished"):
        similarity_matrix(tmp_path)


def test_non_finite_gradients_are_refused_before_a_shard_is_written(tmp_path):
    import datasets

    from hfx.quanta.filters import FEATURES

    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    contexts, targets = samples(4)
    rows = [
        {"token_index": i, "window_id": i, "doc_id": 0, "position": len(c), "token_id": t, "token": str(t),
         "context": "", "context_ids": c, "loss_bits": 0.01}
        for i, (c, t) in enumerate(zip(contexts, targets, strict=True))
    ]  # fmt: skip
    tokens = datasets.Dataset.from_list(rows, features=FEATURES)
    config = GradientConfig(projection_dim=4, seed=0, batch_size=2, tokens_per_shard=4)
    with pytest.raises(ValueError, match="per-token gradients of shard 0: .* not finite"):
        compute_gradients(model, tokens, tmp_path, config, {"model": "tiny"})
    assert not list(tmp_path.glob("**/*.safetensors"))
