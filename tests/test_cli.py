import json
import subprocess
import sys

import pytest

from hfx.cli import main


def test_console_script_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "hfx.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "hfx cartridge run" in out and "hfx cartridge eval" in out


def test_subcommand_help_comes_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cartridge", "train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert (
        "--num_virtual_tokens" in out and "--synthesis_dir" in out and "--gradient_accumulation_steps" in out
    )


def test_unknown_command_and_bad_input_exit_with_a_message(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match="unknown command"):
        main(["cartridge", "frobnicate"])
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


def test_run_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The Zorblat protocol was designed in 1987 by Mara Quell at the Ostrava Institute. " * 10)
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "question": "Who designed the Zorblat protocol?",
                    "choices": ["Mara Quell", "Ivo Brand"],
                    "answer": 0,
                },
                {"question": "When was it designed?", "choices": ["1987", "1991", "2003"], "answer": 0},
            ]
        )
        + "\n"
    )
    argv = [
        "cartridge",
        "run",
        "--corpus",
        str(doc),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path / "run"),
        "--questions",
        str(questions),
        "--num_conversations",
        "4",
        "--conversations_per_chunk",
        "2",
        "--chunk_min_tokens",
        "20",
        "--chunk_max_tokens",
        "40",
        "--max_question_tokens",
        "4",
        "--max_answer_tokens",
        "4",
        "--num_virtual_tokens",
        "8",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "2",
    ]
    main(argv)
    out = capsys.readouterr().out
    assert "| no context |" in out and "| ICL |" in out and "| cartridge (p=8) |" in out
    cartridge = tmp_path / "run" / "cartridge"
    card = (cartridge / "README.md").read_text()
    assert "library_name: peft" in card and "| cartridge (p=8) |" in card and "doc" in card
    assert json.loads((cartridge / "eval_results.json").read_text())["num_questions"] == 2
    assert (tmp_path / "run" / "synthesis" / "README.md").is_file()

    # Evaluating again with the eval subcommand gives the same accuracy numbers.
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
