"""PEER-MLA as a Hub folder: `hfx peer-mla init` writes a self-contained model that loads with
trust_remote_code=True in a process where hfx cannot be imported; `hfx peer-mla analyze` counts parameters."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from hfx.cli import main
from hfx.peer_mla.analysis import analyze_parameters, load_config
from hfx.peer_mla.modeling_peer_mla import PeerMlaForCausalLM
from tests.isolated import run_without_hfx

TINY_YAML = """\
vocab_size: 49152
hidden_size: 32
num_hidden_layers: 3
num_attention_heads: 2
kv_lora_rank: 16
qk_rope_head_dim: 8
qk_nope_head_dim: 8
v_head_dim: 8
intermediate_size: 48
peer_layers: [0, 2]
product_key_dim: [4, 4, 8]
peer_num_heads: 2
num_experts_per_tok: 4
expert_hidden_size: 2
peer_query_dim: 12
tie_word_embeddings: true
"""


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def test_analysis_counts_match_the_instantiated_model(tiny_yaml):
    config = load_config(tiny_yaml)
    report = analyze_parameters(config)
    model = PeerMlaForCausalLM(config)
    assert report.total == sum(p.numel() for p in model.parameters())
    rows = {row.component: row for row in report.rows}
    experts_per_layer = config.num_experts * config.expert_hidden_size * config.hidden_size * 2
    assert rows["peer_experts"].total == 2 * experts_per_layer
    active_per_layer = config.peer_num_heads * config.num_experts_per_tok * config.expert_hidden_size * 32 * 2
    assert rows["peer_experts"].active == 2 * active_per_layer
    assert rows["dense_mlp"].total == rows["dense_mlp"].active == 3 * 32 * 48
    assert "lm_head" not in rows  # tied to the embeddings, which are then all active
    assert rows["embeddings"].active == rows["embeddings"].total


def test_analyze_cli_writes_table_plot_and_json(tiny_yaml, tmp_path, capsys):
    png, counts = tmp_path / "plot.png", tmp_path / "counts.json"
    main(["peer-mla", "analyze", "--config", str(tiny_yaml), "--output", str(png), "--json", str(counts)])
    out = capsys.readouterr().out
    assert "peer_experts" in out and "active/token" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(counts.read_text())
    assert data["total"] == analyze_parameters(load_config(tiny_yaml)).total
    assert 0 < data["active_fraction"] < 1


def test_config_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_YAML + "num_expert: 12\n")
    with pytest.raises(SystemExit, match=r"bad\.yaml: unknown PeerMlaConfig field\(s\) \['num_expert'\]"):
        main(["peer-mla", "analyze", "--config", str(bad), "--output", str(tmp_path / "x.png")])
    inconsistent = tmp_path / "inconsistent.yaml"
    inconsistent.write_text(TINY_YAML + "num_experts: 100\n")
    with pytest.raises(
        SystemExit, match=r"inconsistent\.yaml: PeerMlaConfig\.num_experts=100 does not equal"
    ):
        main(["peer-mla", "analyze", "--config", str(inconsistent), "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


LOAD_WITHOUT_HFX = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, expected_path = sys.argv[1], sys.argv[2]
    try:
        import hfx  # noqa: F401
        raise SystemExit("hfx is importable; the test must run without it")
    except ImportError:
        pass
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    expected = load_file(expected_path)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    generated = model.generate(
        expected["input_ids"], attention_mask=torch.ones_like(expected["input_ids"]), max_new_tokens=5,
        do_sample=False, pad_token_id=tokenizer.eos_token_id,
    )
    print(json.dumps({
        "config_class": type(config).__module__ + "." + type(config).__name__,
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "max_abs_diff": (logits - expected["logits"]).abs().max().item(),
        "generated": generated[0].tolist(),
        "hfx_loaded": any(name == "hfx" or name.startswith("hfx.") for name in sys.modules),
    }))
    """
)


def test_init_writes_a_self_contained_folder_that_loads_without_hfx(tiny_yaml, tmp_path, capsys):
    model_dir = tmp_path / "model"
    main(["peer-mla", "init", "--config", str(tiny_yaml), "--output_dir", str(model_dir), "--seed", "3"])
    assert "model saved in" in capsys.readouterr().out
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "configuration_peer_mla.py", "modeling_peer_mla.py", "model.safetensors"} <= files
    assert {"tokenizer.json", "README.md"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]  # staging dir gone
    card = (model_dir / "README.md").read_text()
    assert "custom_code" in card
    assert "2 × 4 single-neuron experts out of\n**128** by product keys (4 × 4 × 8)" in card  # 4*4*8 experts
    assert "| layers / hidden size | 3 / 32 |" in card
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_peer_mla.PeerMlaForCausalLM"

    model = PeerMlaForCausalLM.from_pretrained(model_dir).eval()
    input_ids = torch.tensor([[1, 520, 33, 7001, 12, 9]])
    with torch.no_grad():
        logits = model(input_ids).logits
    expected_path = tmp_path / "expected.safetensors"
    save_file({"input_ids": input_ids, "logits": logits.contiguous()}, expected_path)
    expected_generation = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=2,
    )[0].tolist()

    report = run_without_hfx(LOAD_WITHOUT_HFX, [model_dir, expected_path], tmp_path)
    assert report["model_class"].startswith("transformers_modules.") and "hfx" not in report["model_class"]
    assert report["config_class"].endswith("configuration_peer_mla.PeerMlaConfig")
    assert not report["hfx_loaded"]
    assert report["max_abs_diff"] < 1e-5
    assert report["generated"] == expected_generation


def test_init_refuses_a_non_empty_output_dir(tiny_yaml, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        main(
            [
                "peer-mla",
                "init",
                "--config",
                str(tiny_yaml),
                "--output_dir",
                str(target),
                "--tokenizer",
                "none",
            ]
        )
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
