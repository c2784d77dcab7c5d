"""The acceptance run: the main job (`make main`) on the embedded model and default corpus (HFX_RUN_HEAVY=1).

`make main` is `hfx cartridge run --corpus rcv1 --questions tests/data/questions/rcv1.jsonl --budget_minutes 18`;
the budget plans the work to fit this machine, and the whole job must end within 20 minutes. It runs once per seed
(three by default: 54 minutes), and the bar is on the mean share of the gap.
"""

import json
import os

import pytest

from hfx import embedded
from hfx.cartridges.pipeline import run_self_study
from hfx.cartridges.synthesis import SynthesisConfig
from tests.conftest import DATA

pytestmark = [pytest.mark.heavy, pytest.mark.integration]

#: The Makefile's `make main` budget.
MAIN_JOB_BUDGET_MINUTES = 18
#: The seeds the main job is run with: the bar is on their mean, not on one draw (one question of 103 moves a run's
#: share of the gap by about 3 points). HFX_MAIN_JOB_SEEDS=0 runs one seed (18 minutes instead of 54).
SEEDS = [int(seed) for seed in os.environ.get("HFX_MAIN_JOB_SEEDS", "0,1,2").split(",")]
#: Mean share of the no-context -> ICL accuracy gap the default cartridge closes on rcv1 over the seeds, chosen from
#: the six runs of `examples/cartridges/grid.py seeds` (docs/cartridges.md, "Seeds and dtypes"): they closed 70-103%,
#: mean 84%, 12 points from seed to seed, so a mean of three seeds has a spread of about 7 points and falls
#: below 70% about once in fifty runs by chance. The goal, 80%, holds on the six runs' mean, not on every three.
GAP_SHARE_BAR = 0.70


def test_the_main_job_closes_the_gap_to_icl_with_8x_fewer_kv_bytes_within_20_minutes(tmp_path):
    questions = DATA / "questions" / f"{embedded.DEFAULT_CORPUS}.jsonl"
    shares, tables = [], []
    for seed in SEEDS:
        out = tmp_path / f"seed{seed}"
        result = run_self_study(
            out,
            embedded.DEFAULT_CORPUS,
            questions,
            SynthesisConfig(seed=seed),
            budget_minutes=MAIN_JOB_BUDGET_MINUTES,
        )
        none, icl, cartridge = result.report["results"]
        tables.append(result.report["table"])
        plan = json.loads((out / "plan.json").read_text())
        assert plan["planned_seconds"] <= MAIN_JOB_BUDGET_MINUTES * 60
        assert result.seconds < 20 * 60, f"seed {seed}: {result.seconds / 60:.1f} min; plan: {plan}"
        assert cartridge["kv_tokens"] * 8 <= result.report["corpus_tokens"]
        assert icl["kv_bytes"] >= 8 * cartridge["kv_bytes"]
        # each run: the cartridge's accuracy interval lies above the no-context score
        assert cartridge["accuracy_interval"][0] > none["accuracy"], result.report["table"]
        shares.append(result.report["gap"][cartridge["condition"]]["share"])
    mean = sum(shares) / len(shares)
    assert mean >= GAP_SHARE_BAR, f"mean share {mean:.0%} over seeds {SEEDS}: {shares}\n" + "\n\n".join(
        tables
    )
