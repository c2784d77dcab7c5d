"""Spaces run locally send Gradio no usage analytics unless the user asks for them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SPACES = Path(__file__).resolve().parents[2] / "spaces"

PROBE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("space_app", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import gradio.analytics
print(gradio.analytics.analytics_enabled())
"""


@pytest.mark.parametrize("space", ["cartridge-chat", "quanta-browser"])
@pytest.mark.parametrize(("setting", "expected"), [(None, "False"), ("True", "True")])
def test_analytics_are_off_unless_asked(space, setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    env["HF_HUB_OFFLINE"] = "1"
    if setting is not None:
        env["GRADIO_ANALYTICS_ENABLED"] = setting
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(SPACES / space / "app.py")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert out.stdout.strip().splitlines()[-1] == expected
