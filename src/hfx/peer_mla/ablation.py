"""Ablations of PEER-MLA pretraining: the cross product of chosen axes, each run under one token budget.

An ablation file (YAML) names a pretraining config, a token budget and the axes::

    base_config: examples/peer_mla/configs/pretrain_cpu.yaml
    output_dir: outputs/peer-mla-ablations
    max_tokens: 409600
    axes:
      mlp: [peer, dense]                        # ModelArguments.mlp
      mixture:                                  # DataArguments.mixture; a mapping gives the values labels
        code: ["python_stdlib:1.0"]
        mixed: ["python_stdlib:0.6", "pydoc_topics:0.2", "sklearn_descr:0.2"]
      num_experts: [4096, 16384]                # split into product_key_parts balanced power-of-two sub-key sets
      product_key_parts: [2, 3]                 # the cartesian dimensionality of the product keys
      peer_num_heads: [1, 4]                    # any other PeerMlaConfig field goes to model_overrides

An axis is a PeerMlaConfig field (sent as ``--model_overrides``), ``num_experts``/``product_key_parts`` (turned
into ``product_key_dim``), or any option of ``examples/peer_mla/pretrain.py`` (``mlp``, ``mixture``,
``learning_rate``, ...). Each run is one ``accelerate launch`` of ``pretrain.py`` on the processes given, in
``output_dir/runs/<name>``. With ``resume`` a finished run of the same arguments is skipped and an interrupted one
continues from its last checkpoint; a run folder made with other arguments is refused, naming them (``overwrite``
runs it again), and an edited base config reruns the runs made from it. The results of all finished runs go into one table
(``results.csv``, ``results.md``) and one plot (``results.png``: held-out perplexity against tokens, and at the end).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hfx.atomic import write_text_atomic
from hfx.stages import Stage, file_fingerprint

from .training import _config_fields, format_value, read_results

logger = logging.getLogger(__name__)

#: The stage (hfx.stages) of one run of an ablation, in its run folder (beside the run's own pretraining stage).
ABLATION_RUN_STAGE = "peer-mla-ablation-run"
# Axes that are turned into product_key_dim rather than passed on.
DERIVED_AXES = ("num_experts", "product_key_parts")
TABLE_COLUMNS = (
    "total_params",
    "active_params",
    "tokens",
    "eval_loss",
    "eval_perplexity",
    "train_loss",
    "train_tokens_per_second",
    "train_runtime_s",
)


@dataclass
class Run:
    """One point of the grid: ``values[axis] = (label, value)``."""

    values: dict[str, tuple[str, object]]

    @property
    def name(self) -> str:
        return "__".join(f"{axis}-{_safe(label)}" for axis, (label, _) in self.values.items()) or "base"

    def labels(self) -> dict[str, str]:
        return {axis: label for axis, (label, _) in self.values.items()}


@dataclass
class AblationConfig:
    base_config: str
    output_dir: str
    axes: dict[str, dict[str, object]]
    max_tokens: int | None = None
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> AblationConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ablation file.")
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error}).") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping with base_config, output_dir and axes.")
        known = {"base_config", "output_dir", "axes", "max_tokens", "overrides"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}.")
        for key in ("base_config", "output_dir", "axes"):
            if key not in values:
                raise ValueError(f"{path}: missing {key!r}.")
        if not isinstance(values["axes"], dict) or not values["axes"]:
            raise ValueError(f"{path}: 'axes' must map axis names to lists (or label: value mappings).")
        axes = {}
        for axis, options in values["axes"].items():
            axes[axis] = _labelled(path, axis, options)
        overrides = values.get("overrides") or []
        if isinstance(overrides, dict):
            overrides = [item for k, v in overrides.items() for item in _cli_args(k, v)]
        return cls(
            base_config=str(values["base_config"]),
            output_dir=str(values["output_dir"]),
            axes=axes,
            max_tokens=values.get("max_tokens"),
            overrides=[str(o) for o in overrides],
        )


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("_") or "x"


def _label(value) -> str:
    if isinstance(value, list | tuple):
        return "x".join(_label(v) for v in value)
    return str(value)


def _labelled(path, axis: str, options) -> dict[str, object]:
    if isinstance(options, dict):
        labelled = {str(k): v for k, v in options.items()}
    elif isinstance(options, list):
        labelled = {_label(v): v for v in options}
        if len(labelled) != len(options):
            raise ValueError(f"{path}: axis {axis!r} lists the same value twice: {options}.")
    else:
        raise ValueError(f"{path}: axis {axis!r} must be a list or a label: value mapping, got {options!r}.")
    if not labelled:
        raise ValueError(f"{path}: axis {axis!r} has no values.")
    return labelled


def _cli_args(option: str, value) -> list[str]:
    """``--option value``; a list becomes several values (``--mixture a:0.5 b:0.5``), a mapping JSON."""
    if isinstance(value, list | tuple):
        return [f"--{option}", *(_cli_value(v) for v in value)]
    return [f"--{option}", _cli_value(value)]


def _cli_value(value) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def grid(config: AblationConfig, axes: list[str] | None = None) -> list[Run]:
    """The runs: the cross product of ``axes`` (all axes by default; the others stay at the base config)."""
    chosen = list(config.axes) if not axes else axes
    missing = [a for a in chosen if a not in config.axes]
    if missing:
        raise ValueError(f"Unknown axis/axes {missing}; the ablation file defines {list(config.axes)}.")
    options = [list(config.axes[a].items()) for a in chosen]
    return [Run(dict(zip(chosen, combo, strict=True))) for combo in itertools.product(*options)]


def balanced_product_key_dim(num_experts: int, parts: int) -> list[int]:
    """``num_experts`` (a power of two) split into ``parts`` power-of-two sub-key set sizes, largest first."""
    if num_experts < 1 or num_experts & (num_experts - 1):
        raise ValueError(
            f"num_experts must be a power of two to be split into product keys, got {num_experts}."
        )
    if parts < 1:
        raise ValueError(f"product_key_parts must be >= 1, got {parts}.")
    bits = int(math.log2(num_experts))
    sizes = [bits // parts + (1 if i < bits % parts else 0) for i in range(parts)]
    return [2**b for b in sizes]


def run_arguments(run: Run, base_model: dict) -> list[str]:
    """Command-line overrides of pretrain.py for one run. ``base_model`` is the base PeerMlaConfig as a dict."""
    config_fields = _config_fields()
    overrides: dict = {}
    cli: list[str] = []
    values = {axis: value for axis, (_, value) in run.values.items()}
    if "num_experts" in values or "product_key_parts" in values:
        base_dims = base_model.get("product_key_dim") or [1]
        experts = int(values.pop("num_experts", math.prod(base_dims)))
        parts = int(values.pop("product_key_parts", len(base_dims)))
        overrides["product_key_dim"] = balanced_product_key_dim(experts, parts)
        query = int(base_model.get("peer_query_dim", 128))
        if query % parts:
            overrides["peer_query_dim"] = parts * math.ceil(query / parts)
    for axis, value in values.items():
        if axis in config_fields:
            overrides[axis] = value
        else:
            cli += _cli_args(axis, value)
    if overrides:
        cli += ["--model_overrides", json.dumps(overrides)]
    return cli


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(
    script: str | os.PathLike,
    arguments: list[str],
    num_processes: int = 1,
    cpu: bool | None = None,
) -> list[str]:
    """``accelerate launch`` of ``script`` on ``num_processes`` processes (CPU when no GPU, or when asked)."""
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    launch += ["--num_processes", str(num_processes), "--main_process_port", str(_free_port())]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if cpu:
        launch.append("--cpu")
    elif num_processes > 1:
        launch.append("--multi_gpu")
    return [*launch, str(script), *arguments]


def _base_model_config(base_config: str) -> dict:
    """The base run's PeerMlaConfig fields (model_config of the pretraining YAML + its model_overrides)."""
    import yaml

    from .analysis import load_config
    from .training import ModelArguments, config_with

    values = yaml.safe_load(Path(base_config).read_text()) or {}
    config = load_config(values.get("model_config", ModelArguments().model_config))
    overrides = values.get("model_overrides")
    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    return config_with(config, overrides).to_dict()


def run_ablation(
    config: AblationConfig,
    script: str | os.PathLike,
    axes: list[str] | None = None,
    resume: bool = False,
    num_processes: int = 1,
    cpu: bool | None = None,
    extra_arguments: list[str] | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Run every point of the grid (skipping finished ones when ``resume``) and write the table and plot. A run
    folder made with other arguments is refused, naming them, unless ``overwrite`` (run it again)."""
    from tqdm.auto import tqdm

    if not Path(config.base_config).is_file():
        raise FileNotFoundError(f"{config.base_config}: base pretraining config not found.")
    output_dir = Path(config.output_dir)
    runs = grid(config, axes)
    base_model = _base_model_config(config.base_config)
    for run in runs:  # check every run's arguments before spending time on the first
        run_arguments(run, base_model)
    if not resume:
        started = [r.name for r in runs if (output_dir / "runs" / r.name).exists()]
        if started:
            raise FileExistsError(
                f"{output_dir}/runs already holds {started}; pass --resume to skip finished runs and continue "
                "interrupted ones, or choose another output_dir."
            )
    progress = tqdm(runs, desc="ablation runs", unit="run")
    base_config_fingerprint = file_fingerprint(config.base_config)
    for run in progress:
        run_dir = output_dir / "runs" / run.name
        progress.set_postfix_str(run.name)
        arguments = ["--config", config.base_config, *config.overrides, *run_arguments(run, base_model)]
        if config.max_tokens is not None:
            arguments += ["--max_tokens", str(config.max_tokens)]
        arguments += [*(extra_arguments or [])]
        # Each run's folder is a stage (hfx.stages): its pretraining arguments and the base config's contents
        # make it. A finished run of the same arguments is skipped; other arguments are refused, naming them
        # (overwrite: run again), and an edited base config reruns it.
        stage = Stage(
            run_dir, ABLATION_RUN_STAGE, {"arguments": arguments}, {"base_config": base_config_fingerprint}
        )
        if stage.begin(overwrite=overwrite) == "done" and read_results(run_dir) is not None:
            logger.info("%s: finished, skipped", run.name)
            continue
        arguments += ["--output_dir", str(run_dir)]
        command = launch_command(script, arguments, num_processes=num_processes, cpu=cpu)
        write_text_atomic(run_dir / "command.json", json.dumps(command[1:], indent=2) + "\n")
        log_path = run_dir / "train.log"
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if status != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(
                f"Run {run.name} failed (exit {status}); its log is {log_path}. Last lines:\n"
                + "\n".join(tail)
            )
        stage.begin()  # (unchanged; rewritten if the run's own stage had to clear the folder)
        stage.finish()
    rows = collect_results(runs, output_dir)
    write_results(rows, list(runs[0].values) if runs else [], output_dir)
    return rows


def collect_results(runs: list[Run], output_dir: Path) -> list[dict]:
    rows = []
    for run in runs:
        results = read_results(output_dir / "runs" / run.name)
        if results is None:
            continue
        rows.append({"run": run.name, **run.labels(), **{k: results.get(k) for k in TABLE_COLUMNS}})
    return rows


def _eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    state = run_dir / "trainer_state.json"
    if not state.is_file():
        return []
    history = json.loads(state.read_text()).get("log_history", [])
    return [
        (entry["num_input_tokens_seen"], entry["eval_perplexity"])
        for entry in history
        if "eval_perplexity" in entry and "num_input_tokens_seen" in entry
    ]


def format_markdown(rows: list[dict], axes: list[str]) -> str:
    columns = ["run", *axes, *TABLE_COLUMNS] if rows else ["run"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], axes: list[str], output_dir: Path) -> None:
    """``results.csv``, ``results.md`` and ``results.png`` in ``output_dir`` (each written atomically)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = ["run", *axes, *TABLE_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(output_dir / "results.csv", buffer.getvalue())
    write_text_atomic(output_dir / "results.md", format_markdown(rows, axes))
    if rows:
        plot_results(rows, output_dir, axes)


def _short_label(row: dict, axes: list[str]) -> str:
    return "/".join(str(row.get(axis, "")) for axis in axes) if axes else row["run"]


def plot_results(rows: list[dict], output_dir: Path, axes: list[str] | None = None) -> Path:
    """Held-out perplexity against training tokens (one line per run) and at the end (bars), runs labelled by
    their axis values in the order named in the title."""
    from matplotlib.figure import Figure

    from hfx.artifacts import save_figure_atomic

    axes = list(axes or [])
    height = 3.2 + 0.22 * len(rows)
    fig = Figure(figsize=(13, height))
    curves, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    labels = [_short_label(row, axes) for row in rows]
    for row, label in zip(rows, labels, strict=True):
        curve = _eval_curve(output_dir / "runs" / row["run"])
        if curve:
            tokens, perplexity = zip(*curve, strict=True)
            curves.plot(tokens, perplexity, marker="o", markersize=3, label=label)
    curves.set_xlabel("training tokens")
    curves.set_ylabel("held-out perplexity")
    curves.set_yscale("log")
    curves.set_title("held-out perplexity during training")
    if curves.lines:
        curves.legend(fontsize=7, loc="upper right", ncol=1 if len(rows) <= 8 else 2, framealpha=0.6)
    values = [row["eval_perplexity"] or float("nan") for row in rows]
    bars.barh(range(len(rows)), values, color="#4C72B0")
    bars.set_yticks(range(len(rows)), labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("held-out perplexity at the end (lower is better)")
    if axes:
        bars.set_title(" / ".join(axes), fontsize=9)
    for i, value in enumerate(values):
        if value == value:
            bars.text(value, i, f" {value:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    saved = save_figure_atomic(fig, output_dir / "results.png")
    return saved


__all__ = [
    "AblationConfig",
    "Run",
    "grid",
    "balanced_product_key_dim",
    "run_arguments",
    "launch_command",
    "run_ablation",
    "collect_results",
    "write_results",
    "format_markdown",
]
