"""The natural-language autoencoder on tiny models: the verbaliser reads its activation at the placeholder, the
processor carries it the way TRL's trainers carry an image, the reconstructor reads explanations of any length,
the GRPO rewards are the scores they are built from, and `hfx lens sft` -> `grpo` -> `eval` runs end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hfx.cli import main
from hfx.lens import nla, nla_pipeline
from hfx.lens.modeling_lens import ConsistencyLens
from hfx.lens.modeling_verbalizer import ActivationVerbalizer, ActivationVerbalizerModel
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def parts(tokenizer):
    base = make_tiny_llama(tokenizer, layers=2, hidden=32, init_std=0.2)
    verbalizer, processor = nla.build_verbalizer(base, tokenizer, layer=1, activation_norm=4.0)
    reconstructor = nla.build_reconstructor(base, layer=1, explanation_length=4).eval()
    return base, verbalizer.eval(), processor, reconstructor


def prompt_ids(processor) -> torch.Tensor:
    ids = processor.apply_chat_template([nla.prompt_of()], add_generation_prompt=True, tokenize=True)[0]
    return torch.tensor([ids])


def test_the_placeholder_token_is_added_to_a_copy_of_the_tokenizer(tokenizer, parts):
    _, verbalizer, processor, _ = parts
    assert nla.ACTIVATION_TOKEN not in tokenizer.get_vocab()  # the caller's tokenizer is left as it was
    assert processor.activation_token_id == len(tokenizer)
    assert verbalizer.config.image_token_id == processor.activation_token_id
    assert verbalizer.config.vocab_size == len(processor.tokenizer)


def test_the_verbalizer_reads_its_activation_at_the_placeholder_only(parts):
    _, verbalizer, processor, _ = parts
    ids = prompt_ids(processor)
    assert (ids == processor.activation_token_id).sum() == 1
    first, second = torch.randn(1, 32), torch.randn(1, 32)
    with torch.no_grad():
        a = verbalizer(input_ids=ids, pixel_values=first).logits
        b = verbalizer(input_ids=ids, pixel_values=second).logits
        again = verbalizer(input_ids=ids, pixel_values=first).logits
        plain = ids.clone()
        plain[plain == processor.activation_token_id] = 0
        unread = [verbalizer(input_ids=plain, pixel_values=x).logits for x in (first, second)]
    position = int((ids[0] == processor.activation_token_id).nonzero())
    torch.testing.assert_close(a, again)
    # tokens before the placeholder cannot see it; every token from it on does
    torch.testing.assert_close(a[:, :position], b[:, :position])
    assert not torch.allclose(a[:, position:], b[:, position:])
    torch.testing.assert_close(unread[0], unread[1])  # no placeholder: pixel_values are not read
    with pytest.raises(ValueError, match="one activation at one placeholder"):
        verbalizer(input_ids=torch.cat([ids, ids], dim=1), pixel_values=first)


def test_the_processor_returns_the_activation_as_pixel_values(parts):
    _, _, processor, _ = parts
    activation = [0.5, -1.0, 2.0]
    prompt = [
        {"role": "user", "content": [{"type": "image", "image": activation}, {"type": "text", "text": "x"}]}
    ]
    encoded = processor.apply_chat_template(
        [prompt, prompt], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert [row.count(processor.activation_token_id) for row in encoded["input_ids"]] == [1, 1]
    assert encoded["pixel_values"].tolist() == [activation, activation]
    text = processor.apply_chat_template(prompt, add_generation_prompt=True)
    assert nla.ACTIVATION_TOKEN + "x" in text
    # TRL's forward pass: one list of images per example
    batch = processor(
        images=[[activation], [[1.0, 2.0, 3.0]]], text=[text, text], padding=True, return_tensors="pt"
    )
    assert batch["pixel_values"].shape == (2, 3) and batch["input_ids"].shape[0] == 2


def test_a_saved_verbalizer_loads_with_the_auto_class(tmp_path, parts):
    _, verbalizer, processor, _ = parts
    verbalizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ActivationVerbalizer)
    ids, activation = prompt_ids(processor), torch.randn(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, pixel_values=activation).logits,
            verbalizer(input_ids=ids, pixel_values=activation).logits,
        )


@pytest.mark.parametrize("read_token", [False, True])
def test_the_reconstructor_reads_each_explanation_up_to_its_length(tokenizer, read_token):
    base = make_tiny_llama(tokenizer, layers=2, hidden=32, init_std=0.2)
    lens = ConsistencyLens.from_base(
        base, layer=1, explanation_length=4, decoder_num_layers=1, encoder_num_layers=2, read_token=read_token
    ).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    with torch.no_grad():
        padded = lens.read(ids, torch.tensor([4, 2]))
        alone = lens.read(torch.tensor([[9, 10]]))
        full = lens.reconstruct(
            F.one_hot(ids[:1], lens.encoder.get_input_embeddings().weight.shape[0]).float()
        )
    torch.testing.assert_close(padded[1], alone[0])  # the padding after an explanation is not read
    torch.testing.assert_close(padded[0], full[0])  # ids and one-hot rows read the same


def test_the_reconstruction_norm_is_capped_where_the_config_says(tokenizer):
    base = make_tiny_llama(tokenizer, layers=2, hidden=32, init_std=0.2)
    reconstructor = nla.build_reconstructor(base, layer=1, explanation_length=4).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 9, 9, 9]])
    with torch.no_grad():
        free = reconstructor.read(ids)
        norms = free.norm(dim=-1)
        reconstructor.config.max_output_norm = float(norms.mean())  # between the two
        capped = reconstructor.read(ids)
    longer, shorter = int(norms.argmax()), int(norms.argmin())
    torch.testing.assert_close(capped[shorter], free[shorter])  # within the cap: unchanged
    assert float(capped[longer].norm()) == pytest.approx(float(norms.mean()), rel=1e-5)  # scaled onto it
    assert float(F.cosine_similarity(capped[longer], free[longer], dim=0)) == pytest.approx(1.0, abs=1e-5)


def test_explanations_are_cut_at_their_first_stop_token():
    ids, lengths = nla.explanation_batch([[5, 6, 2, 7], [2, 9], [3]], stop_ids=[2], pad_id=0)
    assert ids.tolist() == [[5, 6], [2, 0], [3, 0]] and lengths.tolist() == [2, 1, 1]
    penalty = nla.LengthPenalty(stop_ids=[2], max_length=4)
    assert penalty(None, None, [[5, 6, 2, 7], [2, 9], [3, 4, 5, 6]]) == [-0.5, 0.0, -1.0]


def test_the_copy_penalty_is_minus_the_copy_rate_of_the_explanation_before_its_stop():
    penalty = nla.CopyPenalty(stop_ids=[2], window=3)
    contexts = [[40, 41, 5, 6, 7], [5, 6, 7, 8], [9, 9, 9]]
    # 5 and 6 are in the context's last 3 tokens (5, 6, 7) but not 30; after the stop nothing counts; 5 and 40 fell
    # out of the window
    completions = [[5, 30, 6, 30, 2, 7], [2, 5], [5, 40, 31, 9]]
    assert penalty(None, None, completions, context_ids=contexts) == [-0.5, 0.0, -0.25]
    with pytest.raises(ValueError, match="context_ids"):
        penalty(None, None, completions)


def test_grpo_rewards_are_the_reconstruction_the_length_and_the_copy_penalty_weighted(parts):
    _, verbalizer, processor, reconstructor = parts
    stop, pad = nla.stop_ids_of(verbalizer, processor), processor.tokenizer.pad_token_id
    rewards, weights = nla.grpo_rewards(reconstructor, stop, pad, 4, length_penalty=0.1)
    assert [r.__name__ for r in rewards] == ["reconstruction", "length_penalty"] and weights == [1.0, 0.1]
    rewards, weights = nla.grpo_rewards(reconstructor, stop, pad, 4, length_penalty=0.2, copy_penalty=0.25)
    assert [r.__name__ for r in rewards] == ["reconstruction", "length_penalty", "copy_penalty"]
    assert weights == [1.0, 0.2, 0.25] and rewards[1].max_length == 4
    with pytest.raises(ValueError, match="base model"):
        nla.grpo_rewards(reconstructor, stop, pad, 4, kl_weight=0.5)


def test_the_reward_is_the_reconstruction_score_it_is_built_from(parts):
    base, verbalizer, processor, reconstructor = parts
    stop = nla.stop_ids_of(verbalizer, processor)
    completions = [[11, 12, 13, stop[0]], [14, stop[0], 15], [16, 17, 18, 19]]
    explanations = [[11, 12, 13], [14], [16, 17, 18, 19]]
    activations = torch.randn(3, 32)
    contexts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    images = [[a.tolist()] for a in activations]
    with torch.no_grad():
        read = torch.cat([reconstructor.read(torch.tensor([e])) for e in explanations])
    cosine = F.cosine_similarity(read, activations, dim=-1)
    reward = nla.ReconstructionReward(reconstructor, stop, processor.tokenizer.pad_token_id)
    torch.testing.assert_close(torch.tensor(reward(None, None, completions, images)), cosine)

    # with the KL term: cosine minus the weight times each row's KL of the patched next-token distribution
    from hfx.lens.activations import next_token_logits
    from hfx.losses import kl_divergence

    with_kl = nla.ReconstructionReward(
        reconstructor, stop, processor.tokenizer.pad_token_id, base, kl_weight=0.5
    )
    values = with_kl(None, None, completions, images, context_ids=contexts)
    for i in range(3):
        with torch.no_grad():
            logits = next_token_logits(
                base, 1, [contexts[i]], {"reference": None, "patched": read[i : i + 1]}
            )
        kl = float(kl_divergence(logits["reference"], logits["patched"]))
        assert values[i] == pytest.approx(float(cosine[i]) - 0.5 * kl, abs=1e-5)


def test_the_reconstructor_trained_beside_grpo_scores_first_then_learns_and_saves_its_state(
    tmp_path, tokenizer
):
    torch.manual_seed(0)
    base = make_tiny_llama(tokenizer, layers=2, hidden=32, init_std=0.2)

    def reconstructor():
        return nla.build_reconstructor(base, layer=1, explanation_length=4).eval()

    stop = [0]
    completions = [[11, 12, 13, 0], [14, 15, 16, 17], [18, 0, 19, 20], [21, 22, 23, 24]]
    activations = torch.randn(4, 32)
    images = [[a.tolist()] for a in activations]
    lens = reconstructor()
    fit = nla.ReconstructorFit(
        lens, stop, pad_id=0, learning_rate=1e-2, mean=activations.mean(0), mse_weight=1.0
    )
    reward = nla.ReconstructionReward(lens, stop, pad_id=0, fit=fit)
    before = nla.ReconstructionReward(reconstructor(), stop, pad_id=0)(None, None, completions, images)
    logged = {}
    # the reward is the reconstructor's score before its step on these explanations
    assert reward(None, None, completions, images, log_metric=logged.__setitem__) == pytest.approx(before)
    first = logged["reconstructor_loss"]
    losses = [fit.step(completions, activations) for _ in range(20)]
    assert losses[-1] < 0.5 * first  # it learns to read these explanations
    assert not lens.training  # back in eval mode, as the reward reads it

    # save, then load into a fresh reconstructor and optimizer: the next step is the same
    fit.save(tmp_path)
    assert (tmp_path / "reconstructor" / "model.safetensors").is_file() and not list(tmp_path.rglob("*.bin"))
    other = nla.ReconstructorFit(
        reconstructor(), stop, pad_id=0, learning_rate=1e-2, mean=activations.mean(0), mse_weight=1.0
    )
    assert other.load(tmp_path) and not other.load(tmp_path / "nothing")
    for a, b in zip(lens.parameters(), other.reconstructor.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fit.step(completions, activations) == pytest.approx(other.step(completions, activations), rel=1e-6)
    for a, b in zip(lens.parameters(), other.reconstructor.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_reconstructor_examples_add_empty_explanations_with_drawn_activations():
    explanations = [[1, 2], [3], [4, 5, 6], [7]] * 5
    activations = [[float(i), -float(i)] for i in range(20)]
    examples = nla.reconstructor_examples(explanations, activations, empty_fraction=0.1, seed=3)
    assert len(examples) == 22 and examples["explanation_ids"][:20] == explanations
    assert examples["explanation_ids"][20:] == [[], []]
    assert all(a in activations for a in examples["activation"][20:])
    again = nla.reconstructor_examples(explanations, activations, empty_fraction=0.1, seed=3)
    assert again["activation"] == examples["activation"]  # seeded
    assert len(nla.reconstructor_examples(explanations, activations)) == 20
    with pytest.raises(ValueError, match="empty_fraction"):
        nla.reconstructor_examples(explanations, activations, empty_fraction=1.0)
    # an empty explanation is read as one stop token, as the evaluation's empty explanation is
    ids, lengths = nla.explanation_batch(examples["explanation_ids"][19:], stop_ids=[0], pad_id=0)
    assert ids.tolist() == [[7], [0], [0]] and lengths.tolist() == [1, 1, 1]


def test_targets_of_each_kind(parts):
    base = parts[0]
    rows = {"input_ids": [[1, 2, 3, 4, 5], [6, 7]], "reference_topk_ids": [[9, 8, 7, 6], [5, 4, 3, 2]]}
    assert nla.explanation_targets("context", rows, 3) == [[3, 4, 5], [6, 7]]
    assert nla.explanation_targets("top_predictions", rows, 2) == [[9, 8], [5, 4]]
    # tokens that end an explanation (end of text, padding) are never part of a target
    assert nla.explanation_targets("top_predictions", rows, 2, exclude=[8, 4]) == [[9, 7], [5, 3]]
    assert nla.explanation_targets("context", rows, 3, exclude=[4]) == [[2, 3, 5], [6, 7]]
    continuation = nla.explanation_targets("continuation", rows, 3, base)
    expected = base.generate(torch.tensor([[6, 7]]), max_new_tokens=3, do_sample=False)[0, 2:].tolist()
    assert [len(t) for t in continuation] == [3, 3] and continuation[1] == expected
    # the text around the position: the context's last tokens, then the continuation
    window = nla.explanation_targets("window", rows, 4, base, context_tokens=1)
    assert window[1] == [7, *expected]
    with pytest.raises(ValueError, match="must be one of"):
        nla.explanation_targets("summary", rows, 3)


def test_sft_then_grpo_then_eval_end_to_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    reads = []
    embed = ActivationVerbalizerModel.embed

    def counted(self, input_ids, pixel_values=None):
        if pixel_values is not None and (input_ids == self.config.image_token_id).any():
            reads.append(len(input_ids))
        return embed(self, input_ids, pixel_values)

    monkeypatch.setattr(ActivationVerbalizerModel, "embed", counted)
    acts, sft, grpo = tmp_path / "acts", tmp_path / "sft", tmp_path / "grpo"
    model = ["--model_name_or_path", str(tiny_model_dir)]
    main(
        ["lens", "dump", "--output_dir", str(acts), *model, "--dataset", "sklearn_descr", "--layer", "1"]
        + ["--context_length", "16", "--max_examples", "20", "--batch_size", "8"]
    )
    common = ["--activations_dir", str(acts), "--eval_examples", "4", *model, "--explanation_length", "3"]
    common += ["--report_to", "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "4"]
    main(
        ["lens", "sft", *common, "--output_dir", str(sft), "--max_steps", "2", "--target", "top_predictions"]
        + ["--fve_every", "1", "--fve_examples", "3"]
    )
    assert (sft / "hfx_stage_lens-sft.done").is_file() and not list(sft.rglob("checkpoint-*"))
    assert (sft / "verbalizer" / "training_args.json").is_file() and not list(sft.rglob("*.bin"))
    assert "top_predictions" in (sft / "README.md").read_text()
    fit = json.loads((sft / "target_fit.json").read_text())  # the reconstructor reading held-out targets
    assert fit["examples"] == 4 and fit["cosine"] <= 1.0 and 0.0 <= fit["copy_rate"] <= 1.0
    assert nla_pipeline.target_fit_of(sft) == fit
    (sft / "target_fit.json").unlink()  # a folder made before SFT wrote it: computed from its settings
    recomputed = nla_pipeline.target_fit_of(sft, str(acts))
    assert recomputed == pytest.approx(fit) and (sft / "target_fit.json").is_file()
    sft_reads = len(reads)
    # the reconstructor's output norm is capped at the training activations' largest norm
    from hfx.lens.data import load_activations

    train_norms = torch.tensor(load_activations(acts)["activation"][:-4]).norm(dim=-1)
    config = ConsistencyLens.config_class.from_pretrained(sft / "reconstructor")
    assert config.max_output_norm == pytest.approx(float(train_norms.max()))
    assert not nla_pipeline.cap_output_norm(sft, str(acts))  # it has one: nothing to do
    config.max_output_norm = None  # as a folder made before SFT set it
    config.save_pretrained(sft / "reconstructor")
    assert nla_pipeline.cap_output_norm(sft, str(acts)) and not (sft / "target_fit.json").exists()
    capped = ConsistencyLens.config_class.from_pretrained(sft / "reconstructor").max_output_norm
    assert capped == pytest.approx(float(train_norms.max()))
    assert nla_pipeline.target_fit_of(sft, str(acts)) == pytest.approx(fit)
    # each SFT step's forward read its batch's activations, and each held-out measurement its 3
    assert reads == [4, 3, 4, 3]
    state = json.loads((sft / "verbalizer" / "trainer_state.json").read_text())
    heldout = [entry for entry in state["log_history"] if "heldout_fve" in entry]
    assert [entry["step"] for entry in heldout] == [1, 2]
    assert all(0.0 <= entry["heldout_copy_rate"] <= 1.0 for entry in heldout)

    other = tmp_path / "other-acts"  # GRPO must read the dump its SFT folder was trained on
    main(
        ["lens", "dump", "--output_dir", str(other), *model, "--dataset", "sklearn_descr", "--layer", "1"]
        + ["--context_length", "16", "--max_examples", "20", "--batch_size", "8", "--seed", "1"]
    )
    wrong = ["--activations_dir", str(other), *common[2:]]
    with pytest.raises(SystemExit, match="not the activation dump"):
        main(
            ["lens", "grpo", *wrong, "--sft_dir", str(sft), "--output_dir", str(grpo), "--max_steps", "2"]
            + ["--num_generations", "4"]
        )
    assert not grpo.exists()
    main(
        ["lens", "grpo", *common, "--sft_dir", str(sft), "--output_dir", str(grpo), "--max_steps", "2"]
        + ["--num_generations", "4", "--beta", "0.1", "--logging_steps", "1", "--copy_penalty", "0.5"]
        + ["--grpo_reconstructor_learning_rate", "1e-3"]
    )
    # each step: the prompt's prefill in generation, the policy's old log-probs... every forward read them
    grpo_reads = reads[sft_reads:]
    assert len(grpo_reads) >= 3 * 2 and all(n > 0 for n in grpo_reads)
    state = json.loads((grpo / "verbalizer" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "reward" in entry]
    assert len(logged) == 2 and {
        "reconstruction_cosine",
        "reconstructor_loss",
        "kl",
        "rewards/length_penalty/mean",
        "rewards/copy_penalty/mean",
    } <= set(logged[0])
    # the reconstructor learned beside the verbaliser: not the one SFT fitted
    trained = ConsistencyLens.from_pretrained(grpo / "reconstructor").state_dict()
    fitted = ConsistencyLens.from_pretrained(sft / "reconstructor").state_dict()
    assert trained.keys() == fitted.keys() and any(not torch.equal(trained[k], fitted[k]) for k in trained)

    main(
        ["lens", "eval", "--activations_dir", str(acts), "--eval_examples", "4", *model, "--lens", str(grpo)]
    )
    assert "| lens (its explanation read back) |" in capsys.readouterr().out
    results = json.loads((grpo / "eval_results.json").read_text())
    assert results["examples"] == 4 and 0.0 <= results["copy_rate"] <= 1.0
    assert "GRPOTrainer" in (grpo / "README.md").read_text()


def test_a_verbalizer_over_a_backbone_with_other_names(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4)).eval()
    verbalizer, processor = nla.build_verbalizer(base, tokenizer, layer=1)
    assert verbalizer.config.hidden_size == 32 and verbalizer.config.activation_dim == 32  # GPT-2's n_embd
    assert verbalizer.lm_head.weight is verbalizer.get_input_embeddings().weight  # tied, as the base's are
    explanations = nla.explain(verbalizer, processor, torch.randn(2, 32), max_new_tokens=3)
    assert len(explanations) == 2 and all(len(e) <= 3 for e in explanations)
    verbalizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.lm_head.weight, verbalizer.lm_head.weight)


def test_the_reconstructor_loss_is_the_cosine_loss_plus_one_minus_fve(tmp_path):
    from transformers import TrainingArguments

    class Fixed(torch.nn.Module):  # "reads" each explanation as the vector given for it
        def __init__(self, vectors):
            super().__init__()
            self.vectors = vectors
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, explanation_ids, explanation_lengths):
            return SimpleNamespace(reconstruction=self.vectors[explanation_ids[:, 0]] + self.weight)

    target = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    mean = torch.tensor([1.0, 1.0])
    vectors = torch.tensor([[6.0, 8.0], [0.0, 1.0]])  # parallel to the first target, orthogonal to the second
    inputs = {
        "explanation_ids": torch.tensor([[0], [1]]),
        "lengths": torch.tensor([1, 1]),
        "activations": target,
    }
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    cosine_only = nla.ReconstructorTrainer(model=Fixed(vectors), args=args)
    assert float(cosine_only.compute_loss(cosine_only.model, inputs)) == pytest.approx((0 + 2) / 2)
    both = nla.ReconstructorTrainer(model=Fixed(vectors), args=args, mean=mean, mse_weight=0.5)
    error = (25 + 2) / 2  # |(6,8)-(3,4)|^2 = 25, |(0,1)-(1,0)|^2 = 2
    deviation = (13 + 1) / 2  # |(3,4)-(1,1)|^2 = 13, |(1,0)-(1,1)|^2 = 1
    assert float(both.compute_loss(both.model, inputs)) == pytest.approx(1 + 0.5 * error / deviation)
