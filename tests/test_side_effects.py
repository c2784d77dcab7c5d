"""Library calls leave the caller's state alone: torch's global generator, the model's ``requires_grad`` flags,
the config passed in, matplotlib's backend; and they turn only the failures they mean into their own errors."""

from __future__ import annotations

import pytest
import torch

from hfx.models import seeded


def test_seeded_draws_are_reproducible_and_leave_the_global_generator_where_it_was():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        first = torch.rand(4)
    with seeded(7):
        second = torch.rand(4)
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(3), expected_next)  # as if the seeded blocks had not run


def test_cartridge_creation_and_generated_synthesis_do_not_reseed_the_callers_generator(tmp_path, tokenizer):
    from hfx.cartridges.corpus import load_corpus
    from hfx.cartridges.synthesis import SynthesisConfig, synthesize_batch
    from hfx.cartridges.training import create_cartridge
    from tests.conftest import make_tiny_llama

    path = tmp_path / "doc.txt"
    path.write_text("The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 8)
    corpus = load_corpus(path, tokenizer)
    config = SynthesisConfig(
        num_conversations=2,
        conversations_per_chunk=2,
        chunk_min_tokens=40,
        chunk_max_tokens=60,
        max_question_tokens=5,
        max_answer_tokens=4,
        top_k=3,
        continuation_fraction=0.0,  # generated conversations: they sample
    )

    def twice(call):
        torch.manual_seed(99)
        expected_next = torch.rand(2)
        torch.manual_seed(99)
        first = call()
        assert torch.equal(torch.rand(2), expected_next), "the call moved the caller's generator"
        torch.manual_seed(5)  # another caller state: the call's own draws must not depend on it
        return first, call()

    model = make_tiny_llama(tokenizer)
    rows_a, rows_b = twice(lambda: synthesize_batch(model, tokenizer, corpus, config, 0))
    assert [r["input_ids"] for r in rows_a] == [r["input_ids"] for r in rows_b]

    bases = [make_tiny_llama(tokenizer) for _ in range(2)]  # (made here: the helper seeds torch itself)

    def prompt():
        peft_model = create_cartridge(
            bases.pop(), tokenizer, corpus, 4, initialization="random_vectors", seed=3
        )
        return peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight.detach().clone()

    weights_a, weights_b = twice(prompt)
    assert torch.equal(weights_a, weights_b)


def test_per_token_gradients_leave_the_models_requires_grad_flags_as_they_were(tokenizer):
    from hfx.quanta.gradients import PerTokenGradients
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer).requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # a caller's own mix of frozen and trainable
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    rows = PerTokenGradients(model, projection_dim=8)([[5, 6, 7], [8, 9]], [10, 11])
    assert rows.shape[0] == 2 and rows.abs().sum() > 0
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def test_plots_keep_the_matplotlib_backend_and_the_callers_config(tmp_path, tokenizer):
    import matplotlib

    from hfx.peer_mla.analysis import analyze_parameters, init_model, plot_parameters
    from hfx.quanta.clustering import plot_sizes
    from tests.peer_mla.test_modeling import tiny_config

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_sizes(
            [9, 5, 3, 2, 1], {"exponent": 1.0, "intercept": 2.0, "r2": 0.9}, tmp_path / "s.png", "sizes"
        )
        config = tiny_config(vocab_size=len(tokenizer))
        plot_parameters(analyze_parameters(config), tmp_path / "p.png")
        assert matplotlib.get_backend().lower() == "svg"
    finally:
        matplotlib.use(previous)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = config.to_dict()
    init_model(config, tmp_path / "model", tokenizer="embedded")
    assert config.to_dict() == before  # the tokenizer's special ids went into the saved copy only


def test_loading_a_cartridge_turns_only_unreadable_files_into_its_error(tmp_path, tokenizer, monkeypatch):
    from peft import PeftModel

    from hfx.cartridges.corpus import load_corpus
    from hfx.cartridges.training import create_cartridge, load_cartridge
    from tests.conftest import make_tiny_llama

    path = tmp_path / "doc.txt"
    path.write_text("A short document about nothing in particular. " * 10)
    corpus = load_corpus(path, tokenizer)
    create_cartridge(make_tiny_llama(tokenizer), tokenizer, corpus, 4).save_pretrained(tmp_path / "cart")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(PeftModel, "from_pretrained", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):  # not "weights cannot be read"
        load_cartridge(make_tiny_llama(tokenizer), tmp_path / "cart")
