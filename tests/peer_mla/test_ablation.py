"""Ablation grid: axes, derived product keys, per-run overrides, and clear errors for a bad ablation file."""

import json
from pathlib import Path

import pytest
import yaml

from hfx.peer_mla.ablation import (
    AblationConfig,
    balanced_product_key_dim,
    grid,
    launch_command,
    run_arguments,
)

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_grid_and_its_run_arguments():
    config = AblationConfig.from_yaml(ROOT / "examples/peer_mla/configs/ablate_grid.yaml")
    runs = grid(config)
    assert len(runs) == 16 and len({r.name for r in runs}) == 16
    assert [r.name for r in grid(config, ["num_experts", "peer_num_heads"])] == [
        "num_experts-4096__peer_num_heads-1",
        "num_experts-4096__peer_num_heads-4",
        "num_experts-16384__peer_num_heads-1",
        "num_experts-16384__peer_num_heads-4",
    ]
    assert config.overrides[:4] == ["--eval_steps", "50", "--save_steps", "50"]
    assert config.overrides[4:8] == [
        "--tokenizer_mixture",
        "python_stdlib:0.6",
        "pydoc_topics:0.2",
        "sklearn_descr:0.2",
    ]
    base = {"product_key_dim": [128, 128], "peer_query_dim": 128}
    run = next(
        r
        for r in runs
        if r.labels()
        == {"mixture": "code", "num_experts": "16384", "product_key_parts": "3", "peer_num_heads": "4"}
    )
    arguments = run_arguments(run, base)
    assert arguments[:2] == ["--mixture", "python_stdlib:1.0"]
    overrides = json.loads(arguments[arguments.index("--model_overrides") + 1])
    assert overrides == {"product_key_dim": [32, 32, 16], "peer_query_dim": 129, "peer_num_heads": 4}


def test_balanced_product_keys():
    assert balanced_product_key_dim(65536, 2) == [256, 256]
    assert balanced_product_key_dim(4096, 3) == [16, 16, 16]
    assert balanced_product_key_dim(2**21, 2) == [2048, 1024]
    with pytest.raises(ValueError, match="power of two"):
        balanced_product_key_dim(1000, 2)


def test_launch_command_uses_accelerate_on_the_cpu():
    command = launch_command("pretrain.py", ["--max_tokens", "10"], num_processes=2, cpu=True)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2" and "--cpu" in command
    assert command[-3:] == ["pretrain.py", "--max_tokens", "10"]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"output_dir": "x", "axes": {"mlp": ["peer"]}}, "missing 'base_config'"),
        ({"base_config": "b", "output_dir": "x", "axes": {}}, "'axes' must map"),
        ({"base_config": "b", "output_dir": "x", "axes": {"mlp": "peer"}}, "axis 'mlp' must be a list"),
        (
            {"base_config": "b", "output_dir": "x", "axes": {"mlp": ["peer", "peer"]}},
            "lists the same value twice",
        ),
        (
            {"base_config": "b", "output_dir": "x", "axes": {"mlp": ["peer"]}, "budget": 5},
            r"unknown key\(s\) \['budget'\]",
        ),
    ],
)
def test_bad_ablation_files(tmp_path, content, message):
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=message):
        AblationConfig.from_yaml(path)


def test_unknown_axis_is_named():
    config = AblationConfig.from_yaml(ROOT / "examples/peer_mla/configs/peer_vs_dense.yaml")
    with pytest.raises(ValueError, match=r"Unknown axis/axes \['heads'\]"):
        grid(config, ["heads"])
