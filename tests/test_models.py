"""The one loader and the device/dtype resolution every command goes through (hfx.models, hfx.attention)."""

from __future__ import annotations

import pytest
import torch

from hfx import models
from hfx.cli import main

NO_CUDA = not torch.cuda.is_available()


def test_the_default_device_is_accelerates_and_the_default_dtype_fits_it():
    from accelerate import PartialState

    device = models.resolve_device(None)
    assert device == PartialState().device
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert models.resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert models.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_by_name():
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"--device '{device}'.*no CUDA device.*--device cpu"):
            models.resolve_device(device)
    with pytest.raises(ValueError, match="not a device"):
        models.resolve_device("gpu0")
    with pytest.raises(ValueError, match="hfx runs on cuda, xpu, mps, cpu, not meta"):
        models.resolve_device("meta")
    with pytest.raises(ValueError, match="--dtype 'int8' is not one of auto"):
        models.resolve_dtype("int8", torch.device("cpu"))


def test_bfloat16_on_a_device_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(models, "supports_bfloat16", lambda device: False)
    with pytest.raises(ValueError, match="--dtype bfloat16 was asked for, but cpu does not support bfloat16"):
        models.resolve_dtype("bfloat16", torch.device("cpu"))
    # "auto" never picks what the device cannot run.
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_auto_is_bfloat16_on_a_gpu_that_supports_it_and_float32_on_one_that_does_not(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(models, "supports_bfloat16", lambda device: True)
    assert models.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(models, "supports_bfloat16", lambda device: False)
    assert models.resolve_dtype("auto", cuda) == torch.float32


def test_training_auto_is_bfloat16_only_where_the_device_multiplies_it_natively(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for avx512_bf16, amx, expected in [
        (False, False, torch.float32),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert models.resolve_training_dtype("auto", cpu) == expected
    # An explicit choice is kept (and checked) whatever the CPU has.
    assert models.resolve_training_dtype("bfloat16", cpu) == torch.bfloat16
    assert models.resolve_training_dtype("float32", cpu) == torch.float32
    monkeypatch.setattr(models, "supports_bfloat16", lambda device: True)
    assert models.resolve_training_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(models, "supports_bfloat16", lambda device: False)
    assert models.resolve_training_dtype("auto", cuda) == torch.float32


def test_the_loader_places_the_model_on_the_resolved_device_and_dtype(tiny_model_dir):
    model, tokenizer = models.load_causal_lm(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training
    assert tokenizer.pad_token_id is not None
    assert model.config._attn_implementation == "sdpa_gqa"
    model, _ = models.load_causal_lm(str(tiny_model_dir))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_model_ids_name_the_embedded_model_by_its_hub_id(tmp_path):
    from hfx import embedded

    for name in (None, "embedded", embedded.EMBEDDED_MODEL_NAME):
        assert models.model_id(name) == embedded.EMBEDDED_MODEL_ID
    assert models.model_id(str(tmp_path)) == str(tmp_path)


def test_grouped_sdpa_is_chosen_per_call_by_the_device_of_the_tensors(monkeypatch):
    """On the CPU the grouped path runs; on any other device transformers' own SDPA does (checked on `meta`)."""
    from hfx import attention

    calls = []

    def transformers_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.device.type)
        return query.transpose(1, 2), None

    monkeypatch.setattr(attention, "sdpa_attention_forward", transformers_sdpa)
    module = torch.nn.Module()
    module.is_causal = True
    query = torch.randn(1, 4, 3, 8)
    key = value = torch.randn(1, 2, 3, 8)
    out, _ = attention.sdpa_gqa_attention_forward(module, query, key, value, None)
    assert calls == [] and out.shape == (1, 3, 4, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    attention.sdpa_gqa_attention_forward(module, query.to("meta"), key.to("meta"), value.to("meta"), None)
    assert calls == ["meta"]


def test_training_refuses_a_device_other_than_trainers():
    from types import SimpleNamespace

    on_gpu = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(
        ValueError, match=r"--device 'cpu': Trainer trains this process on cuda; add --use_cpu true"
    ):
        models.training_device("cpu", on_gpu)
    assert models.training_device(None, on_gpu) == torch.device("cuda")
    on_cpu = SimpleNamespace(device=torch.device("cpu"))
    assert models.training_device("cpu", on_cpu) == torch.device("cpu")
    if NO_CUDA:
        with pytest.raises(ValueError, match="no CUDA device"):
            models.training_device("cuda", on_cpu)


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(
    "command",
    [
        ["cartridge", "synthesize", "--synthesis_dir", "{out}"],
        ["cartridge", "run", "--output_dir", "{out}"],
        ["cartridge", "train", "--synthesis_dir", "{data}", "--output_dir", "{out}"],
        ["cartridge", "eval", "--cartridge", "{out}", "--questions", "{data}/q.jsonl"],
        ["cartridge", "compose", "--cartridges", "{data}", "{data}", "--output_dir", "{out}"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_cartridge_commands_stop_on_a_missing_device_before_any_work(tmp_path, tiny_model_dir, command):
    out, data = tmp_path / "out", tmp_path / "data"
    argv = [part.format(out=out, data=data) for part in command]
    argv += ["--model_name_or_path", str(tiny_model_dir), "--device", "cuda"]
    with pytest.raises(
        SystemExit, match=r"error: --device 'cuda' was asked for, but this machine has no CUDA"
    ):
        main(argv)
    assert not out.exists()


@pytest.mark.parametrize("command", ["synthesize", "run", "eval", "compose"])
def test_cartridge_commands_stop_on_an_unsupported_dtype_before_any_work(
    tmp_path, tiny_model_dir, monkeypatch, command
):
    monkeypatch.setattr(models, "supports_bfloat16", lambda device: False)
    out = tmp_path / "out"
    argv = {
        "synthesize": ["--synthesis_dir", str(out)],
        "run": ["--output_dir", str(out)],
        "eval": ["--cartridge", str(out), "--questions", str(tmp_path / "q.jsonl")],
        "compose": ["--cartridges", str(tmp_path), str(tmp_path), "--output_dir", str(out)],
    }[command]
    with pytest.raises(SystemExit, match="bfloat16 was asked for, but cpu does not support bfloat16"):
        main(
            ["cartridge", command, *argv, "--model_name_or_path", str(tiny_model_dir), "--dtype", "bfloat16"]
        )
    assert not out.exists()


def test_synthesize_runs_on_the_resolved_device_and_dtype(tmp_path, tiny_model_dir, monkeypatch):
    """`hfx cartridge synthesize --dtype bfloat16`: the model that synthesizes is bf16 on this process's device."""
    import hfx.cartridges.synthesis as synthesis

    seen = []
    real = synthesis.LocalBatches.__call__

    def spy(self, *args, **kwargs):
        seen.append((self.model.device, self.model.dtype))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(synthesis.LocalBatches, "__call__", spy)
    doc = tmp_path / "doc.txt"
    doc.write_text("The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 10)
    main(
        [
            "cartridge", "synthesize", "--corpus", str(doc), "--model_name_or_path", str(tiny_model_dir),
            "--synthesis_dir", str(tmp_path / "s"), "--num_conversations", "2", "--conversations_per_chunk", "2",
            "--chunk_min_tokens", "16", "--chunk_max_tokens", "32", "--max_question_tokens", "3",
            "--max_answer_tokens", "3", "--dtype", "bfloat16",
        ]
    )  # fmt: skip
    assert seen == [(models.resolve_device(None), torch.bfloat16)]
