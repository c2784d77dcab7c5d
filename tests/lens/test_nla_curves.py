"""examples/lens/nla_curves.py on a tiny model: each run is `hfx lens sft` + `hfx lens eval`, a finished run of the
same settings is reused (not evaluated again), one of other settings refused; the table and plot of the runs,
whatever their folders are called."""

import json
import subprocess
from pathlib import Path

import pytest

from hfx.cli import main
from tests.conftest import example_module

CURVES = Path(__file__).parents[2] / "examples" / "lens" / "nla_curves.py"


@pytest.fixture(scope="module")
def curves():
    yield from example_module(CURVES, "nla_curves")


def test_runs_are_reused_refused_when_settings_change_and_tabled(curves, tiny_model_dir, tmp_path, capsys):
    acts, root = tmp_path / "acts", tmp_path / "nla"
    main(
        ["lens", "dump", "--output_dir", str(acts), "--model_name_or_path", str(tiny_model_dir)]
        + ["--dataset", "sklearn_descr", "--layer", "1", "--context_length", "16", "--max_examples", "16"]
    )
    config = tmp_path / "sft.yaml"
    config.write_text(
        "per_device_train_batch_size: 4\nmax_steps: 1\nreconstructor_epochs: 1\nfve_every: 0\nfve_examples: 2\n"
        "report_to: none\ndisable_tqdm: true\nseed: 0\n"
    )
    args = [
        "--config", str(config), "--activations_dir", str(acts), "--model_name_or_path", str(tiny_model_dir),
        "--eval_examples", "4", "--output_root", str(root), "--targets", "top_predictions", "--lengths", "2",
        "--grpo",
    ]  # fmt: skip
    rows = curves.main(args)
    run = root / "top_predictions-k2"
    assert [(r["phase"], r["target"], r["length"]) for r in rows] == [("SFT", "top_predictions", 2)]
    assert rows[0]["target_fve"] is not None and rows[0]["fve_vs_empty"] is not None  # +empty by default
    evaluated, wall = (run / "eval_results.json").stat().st_mtime_ns, (run / "wall.json").read_text()

    assert curves.main(args)[0]["fve"] == rows[0]["fve"]  # reused: neither trained nor evaluated again
    assert (run / "eval_results.json").stat().st_mtime_ns == evaluated
    assert (run / "wall.json").read_text() == wall

    # a run made before SFT capped the reconstructor's output norm gets the cap and is evaluated again
    from hfx.lens.modeling_lens import ConsistencyLens

    config = ConsistencyLens.config_class.from_pretrained(run / "reconstructor")
    cap, config.max_output_norm = config.max_output_norm, None
    config.save_pretrained(run / "reconstructor")
    curves.main(args)
    assert ConsistencyLens.config_class.from_pretrained(run / "reconstructor").max_output_norm == cap
    assert (run / "eval_results.json").stat().st_mtime_ns > evaluated and (run / "target_fit.json").is_file()
    evaluated = (run / "eval_results.json").stat().st_mtime_ns

    with pytest.raises(subprocess.CalledProcessError):  # other settings: `hfx lens sft` refuses the folder
        curves.main([*args, "--", "--reconstructor_epochs", "2"])
    assert (run / "eval_results.json").stat().st_mtime_ns == evaluated

    capsys.readouterr()
    figure = tmp_path / "curves.png"
    curves.main([*args, "--table", "--plot", str(figure)])
    out = capsys.readouterr().out
    assert "| SFT | top_predictions; reconstructor 1 ep, +empty | 2 |" in out
    assert figure.stat().st_size > 0 and json.loads((root / "curves.json").read_text())[0]["run"] == run.name

    run.rename(root / "earlier-recipe")  # a run moved aside stays a row, under its folder's name
    assert [r["run"] for r in curves.main([*args, "--table"])] == ["earlier-recipe"]
    assert curves.main([*args, "--table", "--lengths", "4"]) == []  # not a length asked for
