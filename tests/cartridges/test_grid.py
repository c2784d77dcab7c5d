"""examples/cartridges/grid.py: the grids' runs, and the table and plot it makes of finished runs (the tiny study's)."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import example_module

GRID = Path(__file__).parents[2] / "examples" / "cartridges" / "grid.py"


@pytest.fixture(scope="module")
def grid_module():
    yield from example_module(GRID, "cartridge_grid")


def test_the_grids_name_their_runs_and_settings(grid_module):
    seeds = grid_module.grid("seeds")
    assert list(seeds) == [f"{d}-seed{s}" for s in (0, 1, 2) for d in ("bfloat16", "float32")]
    args = seeds["float32-seed2"]["args"]
    assert args[args.index("--seed") + 1] == "2" and args[args.index("--model_dtype") + 1] == "float32"
    assert args[args.index("--questions") + 1] == "tests/data/questions/rcv1.jsonl"
    generated = grid_module.grid("generated")
    args = generated["b60-gen25"]["args"]
    assert args[args.index("--continuation_fraction") + 1] == "0.75" and "60" in args
    assert grid_module.grid("long")["sklearn_descr"]["args"][-1] == "tests/data/questions/sklearn_descr.jsonl"
    with pytest.raises(SystemExit, match="unknown grid .other."):
        grid_module.grid("other")


def test_table_and_plot_of_finished_runs(grid_module, tiny_study, tmp_path, capsys, monkeypatch):
    root = tmp_path / "outputs" / "seeds"
    for name, conversations in (("bfloat16-seed0", 4), ("float32-seed0", 6)):
        run = Path(shutil.copytree(tiny_study["root"] / "run", root / name))
        (run / "plan.json").write_text(json.dumps({"num_conversations": conversations, "steps": 2}))
        (run / "wall.json").write_text(json.dumps({"minutes": 1.5, "resumed": name.startswith("float")}))
    rows = grid_module.main(["seeds", "--table", "--output_root", str(tmp_path / "outputs")])
    printed = capsys.readouterr().out
    report = json.loads((tiny_study["cartridge"] / "eval_results.json").read_text())
    cartridge = report["results"][2]
    assert [r["run"] for r in rows] == ["bfloat16-seed0", "float32-seed0"]
    assert (
        rows[0]["accuracy"] == cartridge["accuracy"] and rows[0]["p"] == 8 and rows[1]["conversations"] == 6
    )
    assert "| bfloat16-seed0 | 8 | 4 / 2 |" in printed and "1.5 (resumed)" in printed
    assert f"no context {report['results'][0]['accuracy']:.3f}" in printed and "2 questions" in printed
    assert json.loads((root / "grid.json").read_text()) == rows

    runs = {"bfloat16-seed0": {"group": "doc", "ratio": 8}, "float32-seed0": {"group": "doc", "ratio": 16}}
    grid_module.plot(rows, runs, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="unknown runs"):
        grid_module.main(["seeds", "--table", "--runs", "nope"])
