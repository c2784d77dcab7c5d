"""Run exported remote code the way a Hub user without hfx would: a fresh interpreter, offline, where importing
hfx fails, and a modules cache of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_without_hfx(code: str, args: list[str], tmp_path: Path) -> dict:
    """Run `code` with `args` in that interpreter; return the JSON object its last line of output prints."""
    shadow = tmp_path / "shadow" / "hfx"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text("raise ImportError('exported code must not import hfx')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "HF_HUB_OFFLINE": "1"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
