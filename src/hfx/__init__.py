"""hfx: Hugging Face-ecosystem extensions: cartridges, PEER-MLA, quanta discovery, consistency lens.

The public API is imported lazily so that ``import hfx`` stays fast and pulls in neither torch nor gradio.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CartridgeTrainer": "hfx.cartridges.training",
    "CartridgeTrainingArguments": "hfx.cartridges.training",
    "CartridgeCollator": "hfx.cartridges.training",
    "create_cartridge": "hfx.cartridges.training",
    "load_cartridge": "hfx.cartridges.training",
    "SynthesisConfig": "hfx.cartridges.synthesis",
    "synthesize": "hfx.cartridges.synthesis",
    "load_synthesis": "hfx.cartridges.synthesis",
    "load_questions": "hfx.cartridges.evaluation",
    "evaluate_cartridge": "hfx.cartridges.pipeline",
    "run_self_study": "hfx.cartridges.pipeline",
    "load_corpus": "hfx.cartridges.corpus",
    "topk_distillation_loss": "hfx.losses",
    "load_causal_lm": "hfx.models",
    "DeviceArguments": "hfx.models",
    "PeerMlaConfig": "hfx.peer_mla.configuration_peer_mla",
    "PeerMlaModel": "hfx.peer_mla.modeling_peer_mla",
    "PeerMlaForCausalLM": "hfx.peer_mla.modeling_peer_mla",
    "analyze_parameters": "hfx.peer_mla.analysis",
    "PerTokenGradients": "hfx.quanta.gradients",
    "run_discovery": "hfx.quanta.pipeline",
    "load_clusters": "hfx.quanta.viewer",
    "ConsistencyLens": "hfx.lens.modeling_lens",
    "ConsistencyLensConfig": "hfx.lens.configuration_lens",
    "LensTrainer": "hfx.lens.training",
    "LensTrainingArguments": "hfx.lens.training",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hfx' has no attribute {name!r}")
