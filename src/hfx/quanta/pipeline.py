"""The quanta-discovery job, stage by stage, all under one run directory:

    losses/      per-token losses of the corpus (Parquet shards)              `hfx quanta losses`
    tokens/      the kept tokens with their contexts (Parquet)                `hfx quanta filter`
    gradients/   unit-norm per-token gradients (safetensors shards)           `hfx quanta gradients`
    similarity/  cosine-similarity matrix of the gradients (safetensors)      `hfx quanta similarity`
    clusters/    the clustering artifact: Parquet + JSON + sizes plot + card  `hfx quanta cluster`
    viewer/      index.html, a static cluster browser                         `hfx quanta view`

Each stage reads the previous stage's files, so any stage can be re-run alone; the long ones (losses, gradients)
resume after a kill. Every folder is a stage of `hfx.stages`: a rerun with the same settings reuses a finished one,
other settings are refused by name (`--overwrite` makes it again), and a stage whose upstream stage was made again
is made again too. `hfx quanta run` chains them. Under `accelerate launch` the long stages split their shards
over the processes (each on its own GPU: the loader places every process's model on accelerate's device of that
process) and the main process does the rest. Device and dtype are checked before a stage writes anything; the
manifests record the resolved dtype ("float32", "bfloat16"), never "auto", and not the device: a run resumed on
another device continues the same artifacts, except sketched gradients, whose random projections are drawn on the
model's device (their manifest records the device type: a GPU draws other numbers than a CPU).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hfx import models
from hfx.atomic import write_text_atomic
from hfx.documents import DEFAULT_DATASET, load_documents
from hfx.stages import Stage, stage_fingerprint, stage_manifest

from .clustering import CLUSTERS_DIR, CLUSTERS_STAGE, ClusterConfig, cluster_tokens
from .filters import FilterConfig, load_tokens, select_tokens, tokens_stage, write_tokens
from .gradients import DEFAULT_PARAMETERS
from .losses import LOSSES_STAGE, LossesConfig, compute_losses, load_losses
from .similarity import GRADIENTS_STAGE, GradientConfig, compute_gradients, gradient_shards, similarity_matrix

logger = logging.getLogger(__name__)


@dataclass
class RunArguments(models.DeviceArguments):
    """The run directory and the model, with `--device`/`--dtype` (bfloat16 is also about 2x faster on CPUs that
    have it)."""

    output_dir: str = field(
        default="outputs/quanta", metadata={"help": "run directory holding every stage's files"}
    )
    model_name_or_path: str = field(
        default="embedded", metadata={"help": "any causal LM; 'embedded' = SmolLM2-135M-Instruct"}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Compute a stage again when its folder holds one made with other settings (without it: "
            "refused, naming them). The same settings reuse a finished stage and resume an unfinished one."
        },
    )


@dataclass
class LossesArguments:
    dataset: str = field(
        default=DEFAULT_DATASET,
        metadata={
            "help": "bundled collections (pydoc_topics, python_stdlib, sklearn_descr; comma-separated), a text file or directory, or a .parquet/.jsonl/.csv/save_to_disk dataset"
        },
    )
    text_column: str = field(default="text", metadata={"help": "text column of a dataset input"})
    context_length: int = field(
        default=128, metadata={"help": "tokens per window; a token's context is its window prefix"}
    )
    max_tokens: int = field(default=100_000, metadata={"help": "corpus tokens to score"})
    loss_batch_size: int = field(default=16, metadata={"help": "windows per forward"})
    loss_windows_per_shard: int = field(
        default=128,
        metadata={"help": "windows per Parquet shard (the unit of resume and of splitting over processes)"},
    )


@dataclass
class FilterArguments:
    loss_threshold_bits: float = field(
        default=0.1, metadata={"help": "keep tokens with loss below this many bits"}
    )
    skip: int = field(default=1, metadata={"help": "keep every skip-th candidate"})
    num_tokens: int = field(default=2000, metadata={"help": "at most this many tokens"})
    drop_induction: bool = field(
        default=True, metadata={"help": "drop tokens whose trigram occurred earlier in the document"}
    )


@dataclass
class GradientArguments:
    projection_dim: int = field(
        default=256,
        metadata={
            "help": "numbers per layer in the random (Khatri-Rao JL) sketch of its gradient; 0 = exact"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random projection"})
    parameters: str | None = field(
        default=None, metadata={"help": f"regex over module names; default: {DEFAULT_PARAMETERS}"}
    )
    gradient_batch_size: int = field(default=16, metadata={"help": "tokens per backward"})
    gradient_tokens_per_shard: int = field(
        default=256,
        metadata={
            "help": "tokens per safetensors shard (the unit of resume and of splitting over processes)"
        },
    )


@dataclass
class ClusterArguments:
    n_clusters: int = field(default=40, metadata={"help": "number of clusters"})
    n_init: int = field(default=10, metadata={"help": "k-means restarts in the spectral embedding"})
    random_state: int = field(
        default=0, metadata={"help": "seed of the clustering: same inputs, same labels"}
    )
    hub_repo_id: str | None = field(
        default=None, metadata={"help": "also upload the clustering artifact to this Hub dataset repo"}
    )


@dataclass
class ViewArguments:
    max_examples: int = field(default=200, metadata={"help": "examples per cluster on the page"})
    context_chars: int = field(default=300, metadata={"help": "characters of context shown before the token"})


def load_model(run: RunArguments):
    """(model, tokenizer) on the run's device and dtype (checked before the weights are read)."""
    return models.load_causal_lm(run.model_name_or_path, device=run.device, dtype=run.dtype)


def _model_name(run: RunArguments) -> str:
    return models.model_id(run.model_name_or_path)


def _model_manifest(run: RunArguments, model) -> dict:
    # The dtype the model really runs in: "auto" resolves per device, and artifacts record what it became.
    return {"model": _model_name(run), "dtype": models.dtype_name(next(model.parameters()).dtype)}


def run_losses(run: RunArguments, args: LossesArguments, model=None, tokenizer=None):
    """Per-token losses; under `accelerate launch`, each process scores its share of the shards."""
    state = models.process_state()
    if model is None:
        model, tokenizer = load_model(run)
    documents = load_documents(args.dataset, args.text_column)
    config = LossesConfig(
        args.context_length, args.max_tokens, args.loss_batch_size, args.loss_windows_per_shard
    )
    manifest = {**_model_manifest(run, model), "dataset": args.dataset}
    compute_losses(
        model,
        tokenizer,
        documents,
        run.output_dir,
        config,
        manifest,
        state.process_index,
        state.num_processes,
        overwrite=run.overwrite,
    )
    state.wait_for_everyone()
    if state.num_processes > 1 and state.is_main_process:  # each process's shards are written now
        Stage.recorded(Path(run.output_dir) / "losses", LOSSES_STAGE).finish()
    state.wait_for_everyone()
    return load_losses(run.output_dir)


def run_filter(run: RunArguments, args: FilterArguments, tokenizer=None) -> Path:
    """The kept tokens (a stage: reused for the same settings and losses, refused for other settings)."""
    config = FilterConfig(args.loss_threshold_bits, args.skip, args.num_tokens, args.drop_induction)
    stage = tokens_stage(run.output_dir, config)
    if stage.begin(run.overwrite) == "done":
        return stage.directory
    if tokenizer is None:
        tokenizer = models.load_tokenizer(run.model_name_or_path)
    losses = load_losses(run.output_dir)
    rows = select_tokens(losses, tokenizer, config)
    corpus_tokens = sum(len(ids) for ids in losses["input_ids"])
    out = write_tokens(rows, run.output_dir, config, {"corpus_tokens": corpus_tokens})
    stage.finish()
    return out


def run_gradients(run: RunArguments, args: GradientArguments, model=None) -> Path:
    """Per-token gradients; under `accelerate launch`, each process computes its share of the shards."""
    state = models.process_state()
    if model is None:
        model, _ = load_model(run)
    tokens = load_tokens(run.output_dir)
    config = GradientConfig(
        args.projection_dim,
        args.seed,
        args.parameters,
        args.gradient_batch_size,
        args.gradient_tokens_per_shard,
    )
    manifest = _model_manifest(run, model)
    out = compute_gradients(
        model,
        tokens,
        run.output_dir,
        config,
        manifest,
        state.process_index,
        state.num_processes,
        overwrite=run.overwrite,
    )
    state.wait_for_everyone()
    if state.num_processes > 1 and state.is_main_process:  # each process's shards are written now
        gradient_shards(run.output_dir)  # all of them: refused (naming the missing ones) otherwise
        Stage.recorded(out, GRADIENTS_STAGE).finish()
    state.wait_for_everyone()
    return out


def run_similarity(run: RunArguments, device: str | torch.device | None = None) -> Path:
    """The similarity matrix of the gradients, its blocks computed on the run's device (or `device`)."""
    return similarity_matrix(
        run.output_dir, run.device if device is None else device, overwrite=run.overwrite
    )


def run_cluster(run: RunArguments, args: ClusterArguments) -> Path:
    out = Path(run.output_dir)
    tokens = load_tokens(out)
    # The card describes the whole run: merge the settings each earlier stage recorded.
    meta = {}
    losses = stage_manifest(out / "losses", LOSSES_STAGE)
    if losses is not None:
        meta.update(losses["settings"])
    if (out / "tokens" / "filter_config.json").exists():
        meta.update(json.loads((out / "tokens" / "filter_config.json").read_text()))
    gradients = stage_manifest(out / "gradients", GRADIENTS_STAGE)
    if gradients is not None:
        settings = dict(gradients["settings"], tokens=gradients["inputs"]["tokens"])
        settings.pop("layers")
        meta.update(settings, gradient_width=settings["width"])
        meta["gradient_parameters"] = settings["parameters"] or DEFAULT_PARAMETERS
    meta["model"] = _model_name(run)
    clusters = cluster_tokens(
        out, tokens, ClusterConfig(args.n_clusters, args.n_init, args.random_state), meta, run.overwrite
    )
    if args.hub_repo_id:
        from hfx.hub import push_folder

        logger.info("uploaded to %s", push_folder(clusters, args.hub_repo_id, repo_type="dataset"))
    return clusters


def run_view(run: RunArguments, args: ViewArguments) -> Path:
    from .viewer import write_html

    out = Path(run.output_dir)
    clusters = stage_fingerprint(out / CLUSTERS_DIR, CLUSTERS_STAGE)
    if clusters is None:
        raise FileNotFoundError(
            f"{out / CLUSTERS_DIR}: no finished clustering; run `hfx quanta cluster` first."
        )
    stage = Stage(out / "viewer", "quanta-view", asdict(args), {"clusters": clusters})
    page = stage.directory / "index.html"
    if stage.begin(run.overwrite) == "done" and page.exists():
        return page
    stage.reopen()
    write_html(out / CLUSTERS_DIR, page, args.max_examples, args.context_chars)
    stage.finish()
    return page


def run_discovery(
    run: RunArguments,
    losses: LossesArguments,
    filtering: FilterArguments,
    gradients: GradientArguments,
    clustering: ClusterArguments,
    view: ViewArguments,
) -> dict:
    """All stages; each resumes or is redone from its inputs. Returns timings and the artifact paths."""
    state = models.process_state()
    timings = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - start - sum(timings.values())

    model, tokenizer = load_model(run)  # device and dtype are checked here, before any stage writes
    device = next(model.parameters()).device
    run_losses(run, losses, model, tokenizer)
    lap("losses")
    if state.is_main_process:
        run_filter(run, filtering, tokenizer)
    state.wait_for_everyone()
    lap("filter")
    run_gradients(run, gradients, model)
    lap("gradients")
    if not state.is_main_process:
        return {}
    run_similarity(run, device)
    lap("similarity")
    clusters = run_cluster(run, clustering)
    lap("cluster")
    page = run_view(run, view)
    lap("view")
    summary = {
        "timings_seconds": timings,
        "processes": state.num_processes,
        "device": str(device),
        "dtype": models.dtype_name(next(model.parameters()).dtype),
        "clusters": str(clusters),
        "page": str(page),
        "arguments": {
            "run": asdict(run),
            "losses": asdict(losses),
            "filter": asdict(filtering),
            "gradients": asdict(gradients),
            "cluster": asdict(clustering),
            "view": asdict(view),
        },
    }
    write_text_atomic(Path(run.output_dir) / "run.json", json.dumps(summary, indent=2))
    return summary
