"""The stage protocol (hfx.stages): a rerun reuses, resumes, recomputes or refuses, and a folder is never marked done
while it is being cleared or rewritten."""

import json

import pytest

from hfx.stages import Stage, StageMismatch, dataset_fingerprint, stage_fingerprint


def stage(tmp_path, lr=0.1, data="a", name="train"):
    return Stage(tmp_path / "out", name, {"lr": lr, "steps": 4}, {"data": data})


def test_a_new_stage_writes_its_manifest_then_resumes_then_is_reused(tmp_path):
    first = stage(tmp_path)
    assert first.begin() == "new"
    manifest = json.loads(first.manifest_path.read_text())
    assert manifest == {
        "stage": "train",
        "version": 1,
        "settings": {"lr": 0.1, "steps": 4},
        "inputs": {"data": "a"},
    }
    (first.directory / "checkpoint-2").mkdir()
    assert stage(tmp_path).begin() == "resume"  # killed before it finished: what is there is kept
    assert (first.directory / "checkpoint-2").is_dir()
    assert not first.done and stage_fingerprint(first.directory, "train") is None
    first.finish()
    assert first.done and stage(tmp_path).begin() == "done"
    assert stage_fingerprint(first.directory, "train") == first.fingerprint


def test_other_settings_are_refused_by_name_and_overwrite_starts_over(tmp_path):
    first = stage(tmp_path)
    first.begin()
    (first.directory / "result.bin").write_bytes(b"old")
    first.finish()
    with pytest.raises(StageMismatch, match=r"settings\.lr: 0\.1 -> 0\.2") as error:
        stage(tmp_path, lr=0.2).begin()
    assert "--overwrite" in str(error.value)
    assert first.done and (first.directory / "result.bin").exists()  # refused: nothing touched
    again = stage(tmp_path, lr=0.2)
    assert again.begin(overwrite=True) == "new"
    assert sorted(p.name for p in again.directory.iterdir()) == ["hfx_stage_train.json"]
    assert not first.done and not again.done


def test_changed_inputs_recompute_the_stage(tmp_path, caplog):
    first = stage(tmp_path)
    first.begin()
    (first.directory / "result.bin").write_bytes(b"old")
    first.finish()
    with caplog.at_level("WARNING", logger="hfx.stages"):
        assert stage(tmp_path, data="b").begin() == "new"
    assert "inputs.data" in caplog.text
    assert not (first.directory / "result.bin").exists()
    assert json.loads(first.manifest_path.read_text())["inputs"] == {"data": "b"}


def test_a_folder_of_other_files_is_refused_unless_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StageMismatch, match="holds files but no hfx_stage_train.json"):
        stage(tmp_path).begin()
    assert (out / "notes.txt").exists()
    assert stage(tmp_path).begin(overwrite=True) == "new" and not (out / "notes.txt").exists()


def test_stages_share_a_folder_and_clearing_takes_markers_first(tmp_path, monkeypatch):
    outer = stage(tmp_path, name="ablation-run")
    outer.begin()
    (outer.directory / "command.json").write_text("[]")
    inner = stage(tmp_path, name="pretrain")
    assert inner.begin() == "new"  # beside another stage's files: not a foreign folder
    inner.finish()
    outer.finish()

    # a kill in the middle of clearing: whatever is left is no longer marked done
    import shutil

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    (inner.directory / "checkpoint-4").mkdir()
    with pytest.raises(KeyboardInterrupt):
        stage(tmp_path, lr=0.3, name="pretrain").begin(overwrite=True)
    assert not inner.done and not outer.done


def test_reopen_unmarks_before_a_rewrite(tmp_path):
    first = stage(tmp_path)
    first.begin()
    first.finish()
    first.reopen()
    assert not first.done and stage(tmp_path).begin() == "resume"


def test_dataset_fingerprint_follows_the_rows():
    import datasets

    rows = [{"a": i, "b": [i, i + 1]} for i in range(5)]
    one = datasets.Dataset.from_list(rows)
    assert dataset_fingerprint(one) == dataset_fingerprint(datasets.Dataset.from_list(rows))
    assert dataset_fingerprint(one) != dataset_fingerprint(datasets.Dataset.from_list(rows[:4]))
    assert dataset_fingerprint(one.select([1, 0, 2, 3, 4])) != dataset_fingerprint(one)
