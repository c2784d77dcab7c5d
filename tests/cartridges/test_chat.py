"""The chat engine is library code: it imports without Gradio (the Space adds the UI on top)."""

from __future__ import annotations

import subprocess
import sys


def test_the_chat_engine_imports_without_gradio():
    code = (
        "import sys, hfx.cartridges.chat as chat; print('gradio' in sys.modules, 'ChatEngine' in vars(chat))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
