"""Where a PEER-MLA model's parameters are, and how many of them one token uses.

The model is built on the meta device, so a million-expert configuration costs no memory. A parameter is
*active* for a token if it takes part in that token's forward computation: every attention, router and norm
weight; one embedding row; the `peer_num_heads * num_experts_per_tok` retrieved experts of each PEER layer (an
upper bound: heads may retrieve the same expert); the whole output head.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hfx.artifacts import save_figure_atomic
from hfx.atomic import atomic_folder

from .configuration_peer_mla import PeerMlaConfig

logger = logging.getLogger(__name__)

COMPONENTS = ("embeddings", "attention", "peer_router", "peer_experts", "dense_mlp", "norms", "lm_head")

# Keys that save_pretrained writes into config.json besides PeerMlaConfig's own arguments.
_GENERIC_CONFIG_KEYS = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "return_dict",
}


@dataclass
class ComponentCount:
    component: str
    total: int
    active: int


@dataclass
class ParameterReport:
    rows: list[ComponentCount]
    config: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(row.total for row in self.rows)

    @property
    def active(self) -> int:
        return sum(row.active for row in self.rows)

    def to_dict(self) -> dict:
        return {
            "components": [asdict(row) for row in self.rows],
            "total": self.total,
            "active": self.active,
            "active_fraction": self.active / self.total,
        }


def load_config(path: str | os.PathLike) -> PeerMlaConfig:
    """A PeerMlaConfig from a model directory, a config.json, or a YAML file of PeerMlaConfig arguments."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file or model directory.")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: directory has no config.json.")
        return PeerMlaConfig.from_pretrained(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error}).") from None
    elif path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON (line {error.lineno}: {error.msg}).") from None
    else:
        raise ValueError(f"{path}: expected a .yaml, .yml or .json config, or a model directory.")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of PeerMlaConfig fields, got {type(values).__name__}.")
    known = set(inspect.signature(PeerMlaConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(values) - known - _GENERIC_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown PeerMlaConfig field(s) {unknown}; known fields: {sorted(known)}.")
    if values.get("model_type", "peer_mla") != "peer_mla":
        raise ValueError(f"{path}: model_type is {values['model_type']!r}, not 'peer_mla'.")
    try:
        return PeerMlaConfig(**{k: v for k, v in values.items() if k not in _GENERIC_CONFIG_KEYS})
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _component(name: str, module_types: dict[str, str]) -> str:
    if name.startswith("lm_head"):
        return "lm_head"
    if name.startswith("model.embed_tokens"):
        return "embeddings"
    owner = name.rsplit(".", 1)[0]
    kind = module_types.get(owner, "")
    if ".self_attn." in name and "layernorm" not in name:
        return "attention"
    if ".router." in name:
        return "peer_router"
    if kind == "PeerExperts":
        return "peer_experts"
    if ".mlp." in name:
        return "dense_mlp"
    return "norms"


def analyze_parameters(config: PeerMlaConfig) -> ParameterReport:
    """Total and per-token active parameters of a PEER-MLA model, by component."""
    from .modeling_peer_mla import PeerMlaForCausalLM

    with torch.device("meta"):
        model = PeerMlaForCausalLM(config)
    module_types = {name: type(module).__name__ for name, module in model.named_modules()}
    totals = dict.fromkeys(COMPONENTS, 0)
    active = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():  # tied weights are listed once
        component = _component(name, module_types)
        totals[component] += param.numel()
        if component == "peer_experts":
            per_expert = param.numel() // config.num_experts
            active[component] += per_expert * config.peer_num_heads * config.num_experts_per_tok
        elif component == "embeddings":
            tied_head = config.tie_word_embeddings
            active[component] += param.numel() if tied_head else config.hidden_size
        else:
            active[component] += param.numel()
    rows = [ComponentCount(c, totals[c], active[c]) for c in COMPONENTS if totals[c]]
    return ParameterReport(rows=rows, config=config.to_dict())


def _human(count: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(int(count))


def format_table(report: ParameterReport) -> str:
    lines = [f"{'component':14s} {'total':>12s} {'active/token':>14s} {'active %':>9s}"]
    for row in [*report.rows, ComponentCount("all", report.total, report.active)]:
        share = 100 * row.active / row.total if row.total else 0.0
        lines.append(f"{row.component:14s} {_human(row.total):>12s} {_human(row.active):>14s} {share:8.2f}%")
    return "\n".join(lines)


def plot_parameters(report: ParameterReport, output: str | os.PathLike, title: str | None = None) -> Path:
    """A bar chart (log scale) of total vs active parameters per component, written atomically as PNG."""
    from matplotlib.figure import Figure

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    names = [row.component for row in report.rows] + ["all"]
    totals = [row.total for row in report.rows] + [report.total]
    actives = [row.active for row in report.rows] + [report.active]
    positions = range(len(names))
    fig = Figure(figsize=(8, 0.55 * len(names) + 1.6))
    ax = fig.subplots()
    ax.barh([p + 0.2 for p in positions], totals, height=0.4, label="total", color="#4c72b0")
    ax.barh([p - 0.2 for p in positions], actives, height=0.4, label="active per token", color="#dd8452")
    for p, (t, a) in enumerate(zip(totals, actives, strict=True)):
        ax.text(t, p + 0.2, f" {_human(t)}", va="center", fontsize=8)
        ax.text(a, p - 0.2, f" {_human(a)}", va="center", fontsize=8)
    ax.set_yticks(list(positions), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=max(totals) * 12)  # room for the labels
    ax.set_xlabel("parameters (log scale)")
    heading = f"{_human(report.total)} total, {_human(report.active)} active per token"
    ax.set_title(f"{title}: {heading}" if title else f"PEER-MLA: {heading}", pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    save_figure_atomic(fig, output, dpi=120)
    return output


def init_model(
    config: PeerMlaConfig,
    output_dir: str | os.PathLike,
    tokenizer: str | None = "embedded",
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a randomly initialised PeerMlaForCausalLM as a self-contained Hub folder (code, config, safetensors,
    tokenizer, card). The folder appears only when complete."""
    from transformers import AutoTokenizer

    from hfx import embedded
    from hfx.models import seeded

    from .modeling_peer_mla import PeerMlaForCausalLM

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} already exists and is not empty; choose another --output_dir.")
    tok = None
    if tokenizer:
        path = embedded.embedded_model_path() if tokenizer == "embedded" else tokenizer
        tok = AutoTokenizer.from_pretrained(path)
        if len(tok) > config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer!r} has {len(tok)} tokens but vocab_size is {config.vocab_size}; "
                f"set vocab_size >= {len(tok)}."
            )
        config = copy.deepcopy(config)  # the tokenizer's special ids go into the saved copy, not the caller's
        config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        config.pad_token_id = tok.pad_token_id
    with seeded(seed):  # the initial weights, drawn without touching the caller's generators
        model = PeerMlaForCausalLM(config).to(getattr(torch, dtype))
    report = analyze_parameters(config)
    with atomic_folder(output_dir) as staging:
        model.save_pretrained(staging)
        if tok is not None:
            tok.save_pretrained(staging)
        write_model_card(
            staging, config, report, training=f"Randomly initialised (seed {seed}); not trained."
        )
    logger.info("wrote %s (%s parameters)", output_dir, _human(report.total))
    return output_dir


def write_model_card(
    model_dir: str | os.PathLike,
    config: PeerMlaConfig,
    report: ParameterReport | None = None,
    training: str = "",
    results: dict | None = None,
) -> str:
    """Render model_cards/peer_mla_card.md into `model_dir/README.md` with the model's real numbers."""
    from hfx.hub import render_card

    from .modeling_peer_mla import latent_cache_bytes_per_token

    report = report or analyze_parameters(config)
    return render_card(
        "peer_mla_card.md",
        Path(model_dir) / "README.md",
        card_data={
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": ["hfx", "peer", "mixture-of-experts", "mla", "custom_code"],
        },
        config=config,
        table=format_table(report),
        report=report.to_dict(),
        cache_bytes=latent_cache_bytes_per_token(config),
        training=training,
        results=results or {},
    )
