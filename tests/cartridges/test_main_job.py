"""The acceptance run: the main job on the embedded model and default corpus (≈18 min; HFX_RUN_HEAVY=1)."""

import pytest

from hfx import embedded
from hfx.cartridges.pipeline import run_self_study
from tests.conftest import DATA

pytestmark = [pytest.mark.heavy, pytest.mark.integration]


def test_default_cartridge_closes_half_the_gap_to_icl_with_8x_fewer_kv_bytes(tmp_path):
    questions = DATA / "questions" / f"{embedded.DEFAULT_CORPUS}.jsonl"
    result = run_self_study(tmp_path / "run", embedded.DEFAULT_CORPUS, questions)
    none, icl, cartridge = result.report["results"]
    assert cartridge["kv_tokens"] * 8 <= result.report["corpus_tokens"]
    assert icl["kv_bytes"] >= 8 * cartridge["kv_bytes"]
    assert cartridge["accuracy"] > none["accuracy"]
    assert cartridge["accuracy"] - none["accuracy"] >= 0.5 * (icl["accuracy"] - none["accuracy"]), (
        result.report["table"]
    )
    assert result.seconds < 20 * 60
