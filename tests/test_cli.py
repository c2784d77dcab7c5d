import json
import subprocess
import sys

import pytest

from hfx import __version__
from hfx.cli import COMMANDS, GROUPS, SUBGROUPS, main


def test_console_script_help_lists_the_groups_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "hfx.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: hfx" in out and all(group in out for group in GROUPS)
    assert "Thin" not in out  # written for users, not a note to developers
    version = subprocess.run(
        [sys.executable, "-m", "hfx.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.strip() == f"hfx {__version__}"


@pytest.mark.parametrize(
    "key", [(group,) for group in GROUPS] + list(SUBGROUPS) + list(COMMANDS), ids=" ".join
)
def test_every_group_and_command_answers_help(key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*key, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: hfx {' '.join(key)}" in out
    if key in COMMANDS:
        command = COMMANDS[key]
        assert command.example in out
        assert "example:" in out
    else:  # a group lists its commands (and its groups' names)
        depth = len(key) + 1
        assert all(k[len(key)] in out for k in COMMANDS if len(k) >= depth and k[: len(key)] == key)


def test_a_group_inside_a_group_without_its_command_shows_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cartridge", "library"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hfx cartridge library" in out and "build" in out and "ask" in out


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("key", list(COMMANDS), ids=" ".join)
def test_every_example_in_the_help_parses(key, monkeypatch):
    """The example each --help shows uses real options (parsed, not run)."""
    import argparse
    import shlex

    from trl import TrlParser

    parse_config = TrlParser.parse_args_and_config
    parse_plain = argparse.ArgumentParser.parse_args

    def stop_after(parse):
        def parsed(self, *args, **kwargs):
            parse(self, *args, **kwargs)
            raise _Parsed

        return parsed

    monkeypatch.setattr(TrlParser, "parse_args_and_config", stop_after(parse_config))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after(parse_plain))
    words = shlex.split(COMMANDS[key].example)
    assert tuple(words[1 : 1 + len(key)]) == key
    with pytest.raises(_Parsed):
        main(words[1:])


def test_subcommand_help_comes_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cartridge", "train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert (
        "--num_virtual_tokens" in out and "--synthesis_dir" in out and "--gradient_accumulation_steps" in out
    )


def test_unknown_commands_and_options_name_the_nearest_valid_ones(capsys):
    for argv, expected in (
        (["cartrige", "run"], "Did you mean 'cartridge'"),
        (["cartridge", "trian"], "Did you mean 'train'"),
        (["cartridge", "eval", "--questoins", "q.jsonl"], "Did you mean '--questions'"),
        (["peer-mla", "analyze", "--config", "x.yaml", "--ouput", "p.png"], "Did you mean '--output'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err


def test_unknown_command_and_bad_input_exit_with_a_message(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["cartridge", "frobnicate"])
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
    empty = tmp_path / "empty.md"
    empty.write_text("")
    with pytest.raises(SystemExit, match=r"error: .*empty\.md: the document is empty"):
        main(
            [
                "cartridge",
                "synthesize",
                "--corpus",
                str(empty),
                "--model_name_or_path",
                str(tiny_model_dir),
                "--synthesis_dir",
                str(tmp_path / "s"),
            ]
        )
    assert not (tmp_path / "s").exists()

    # A dataset without the teacher's log-probs cannot train a cartridge: the shard and the columns are named.
    import datasets

    shard = tmp_path / "no-teacher" / "data" / "train-00000.parquet"
    shard.parent.mkdir(parents=True)
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "answer_start": [1]}).to_parquet(str(shard))
    with pytest.raises(
        SystemExit, match=r"train-00000\.parquet: missing column\(s\) conversation_id, .*topk_logprobs"
    ):
        main(
            [
                "cartridge", "train", "--synthesis_dir", str(shard.parents[1]), "--model_name_or_path",
                str(tiny_model_dir), "--output_dir", str(tmp_path / "cart"),
            ]
        )  # fmt: skip
    assert not (tmp_path / "cart").exists()


def test_run_end_to_end_on_a_tiny_model(tiny_study, tiny_model_dir, tmp_path, capsys):
    """`hfx cartridge run` (the session's tiny study) prints the table and writes the card, the evaluation and the
    dataset card; `hfx cartridge eval` of its cartridge gives the same accuracies."""
    doc, questions, out = tiny_study["doc"], tiny_study["questions"], tiny_study["printed"]
    assert "| no context |" in out and "| ICL |" in out and "| cartridge (p=8) |" in out
    cartridge = tiny_study["cartridge"]
    card = (cartridge / "README.md").read_text()
    assert "library_name: peft" in card and "| cartridge (p=8) |" in card and "zorblat" in card
    assert json.loads((cartridge / "eval_results.json").read_text())["num_questions"] == 2
    assert (tiny_study["synthesis"] / "README.md").is_file()

    # Evaluating again with the eval subcommand (of a copy: it writes its evaluation) gives the same accuracies.
    import shutil
    from pathlib import Path

    cartridge = Path(shutil.copytree(cartridge, tmp_path / "cartridge"))
    main(
        [
            "cartridge",
            "eval",
            "--cartridge",
            str(cartridge),
            "--corpus",
            str(doc),
            "--questions",
            str(questions),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--throughput_batch",
            "0",
        ]
    )
    again = capsys.readouterr().out
    first_rows = [
        line.split("|")[2] for line in out.splitlines() if line.startswith("| c") or line.startswith("| n")
    ]
    again_rows = [
        line.split("|")[2] for line in again.splitlines() if line.startswith("| c") or line.startswith("| n")
    ]
    assert first_rows == again_rows
