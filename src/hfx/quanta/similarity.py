"""Stages 3-4: per-token gradients (sharded, resumable), then their cosine-similarity matrix in blocks.

Gradients are written as safetensors shards `gradients/gradients-*.safetensors` (`token_index`, unit-norm
`gradients` rows) so that a killed run resumes at the next shard. The similarity C = G G^T is assembled from pairs
of shards, so only two shards and the n x n result are in memory at once; each block is computed on the device
given (a GPU when there is one) and comes back to the CPU, where the matrix is written. The clustering affinity is
the angular one, 1 - arccos(C) / pi (in [0, 1], 1 for identical directions).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from hfx.artifacts import require_finite, save_safetensors_atomic
from hfx.stages import Stage, begin_stage, run_shards, stage_fingerprint, stage_manifest

from .gradients import PerTokenGradients

logger = logging.getLogger(__name__)

#: The stage (hfx.stages) of the per-token gradients, in ``<run>/gradients``.
GRADIENTS_STAGE = "quanta-gradients"
#: The stage of the similarity matrix, in ``<run>/similarity``: made from the finished gradients alone.
SIMILARITY_STAGE = "quanta-similarity"

GRADIENTS_DIR = "gradients"
SIMILARITY_DIR = "similarity"


@dataclass
class GradientConfig:
    projection_dim: int = 256
    seed: int = 0
    parameters: str | None = None
    batch_size: int = 16
    tokens_per_shard: int = 256

    def __post_init__(self):
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0 = exact gradients), got {self.projection_dim}.")
        if self.batch_size < 1 or self.tokens_per_shard < 1:
            raise ValueError("batch_size and tokens_per_shard must be >= 1.")


def compute_gradients(
    model,
    tokens,
    output_dir: str | Path,
    config: GradientConfig,
    manifest: dict,
    process_index: int = 0,
    num_processes: int = 1,
    overwrite: bool = False,
) -> Path:
    """Unit-norm per-token gradient rows of the kept tokens, in shards (skipping those already written); returns
    the gradients directory. With several processes, process i writes shards i, i + n, ..."""
    out = Path(output_dir) / GRADIENTS_DIR
    gradients = PerTokenGradients(model, config.projection_dim, config.seed, config.parameters)
    # The folder is a stage (hfx.stages): the model and these settings make it; the kept tokens are its input (a
    # re-filtered set, even of the same size, computes the gradients again).
    stage = Stage(
        out,
        GRADIENTS_STAGE,
        {
            **manifest,
            **asdict(config),
            "layers": gradients.spec.layers,
            "width": gradients.spec.width,
            "projection_device": gradients.spec.projection_device,
        },
        {"tokens": len(tokens), "token_index_sha256": token_index_digest(tokens["token_index"])},
    )
    begin_stage(stage, overwrite, process_index, num_processes)

    def shard_size(shard: int) -> int:
        return min(config.tokens_per_shard, len(tokens) - shard * config.tokens_per_shard)

    def write_shard(shard: int, bar) -> None:
        rows = tokens.select(
            range(shard * config.tokens_per_shard, shard * config.tokens_per_shard + shard_size(shard))
        )
        contexts, targets = rows["context_ids"], rows["token_id"]
        # Batches of similar context length waste little on padding; rows go back to canonical order after.
        order = sorted(range(len(rows)), key=lambda i: len(contexts[i]))
        result = None
        for start in range(0, len(order), config.batch_size):
            picked = order[start : start + config.batch_size]
            grads = gradients([contexts[i] for i in picked], [targets[i] for i in picked])
            if result is None:
                result = torch.empty(len(rows), grads.shape[1])
            # Rows are written from the CPU whatever device computed them.
            result[picked] = torch.nn.functional.normalize(grads, dim=1).cpu()
            bar.update(len(picked))
        require_finite(result, f"per-token gradients of shard {shard}")
        save_safetensors_atomic(
            {"token_index": torch.tensor(rows["token_index"]), "gradients": result}, _shard(out, shard)
        )

    run_shards(
        math.ceil(len(tokens) / config.tokens_per_shard),
        lambda shard: _shard(out, shard),
        write_shard,
        shard_size,
        process_index,
        num_processes,
        desc="per-token gradients",
        unit="tok",
    )
    if num_processes == 1:  # else the main process, once every process's shards are written
        stage.finish()
    return out


def token_index_digest(token_index) -> str:
    """SHA-256 of the kept tokens' corpus indices, in order."""
    return hashlib.sha256(torch.tensor(list(token_index), dtype=torch.int64).numpy().tobytes()).hexdigest()


def _shard(out: Path, index: int) -> Path:
    return out / f"gradients-{index:05d}.safetensors"


def gradient_shards(output_dir: str | Path) -> list[Path]:
    out = Path(output_dir) / GRADIENTS_DIR
    manifest = stage_manifest(out, GRADIENTS_STAGE)
    if manifest is None:
        raise FileNotFoundError(f"{out}: no gradients; run `hfx quanta gradients` first.")
    expected = math.ceil(manifest["inputs"]["tokens"] / manifest["settings"]["tokens_per_shard"])
    shards = [_shard(out, i) for i in range(expected)]
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{out}: gradient shards missing ({', '.join(missing[:3])}...); rerun `hfx quanta gradients` to finish."
        )
    return shards


def _load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor("token_index"), handle.get_tensor("gradients")


def similarity_matrix(
    output_dir: str | Path, device: str | torch.device | None = None, overwrite: bool = False
) -> Path:
    """Cosine similarities between all token gradients, assembled shard pair by shard pair.

    Blocks are multiplied on `device` (default: this process's device, as `hfx.models.resolve_device` picks it)
    in float32, and gathered into the matrix on the CPU. A stage (hfx.stages): the matrix of the same finished
    gradients is reused; new gradients make it again."""
    from hfx.models import resolve_device

    device = resolve_device(device)
    gradients = stage_fingerprint(Path(output_dir) / GRADIENTS_DIR, GRADIENTS_STAGE)
    if gradients is None:
        raise FileNotFoundError(
            f"{Path(output_dir) / GRADIENTS_DIR}: the gradients are not finished; run `hfx quanta gradients` first."
        )
    out = Path(output_dir) / SIMILARITY_DIR / "similarity.safetensors"
    stage = Stage(out.parent, SIMILARITY_STAGE, {}, {"gradients": gradients})
    if stage.begin(overwrite) == "done":
        if out.exists():
            return out
        stage.reopen()  # marked done, but its file is gone: made again
    shards = gradient_shards(output_dir)
    sizes, indices = [], []
    for path in shards:
        with safe_open(str(path), "pt") as handle:
            indices.append(handle.get_tensor("token_index"))
            sizes.append(indices[-1].numel())
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    n = offsets[-1]
    similarity = torch.empty(n, n, dtype=torch.float32)
    pairs = [(i, j) for i in range(len(shards)) for j in range(i, len(shards))]
    for i, j in tqdm(pairs, desc="similarity blocks", unit="block"):
        left = _load(shards[i])[1].to(device)
        right = left if i == j else _load(shards[j])[1].to(device)
        block = (left @ right.t()).clamp_(-1.0, 1.0).cpu()
        similarity[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]] = block
        similarity[offsets[j] : offsets[j + 1], offsets[i] : offsets[i + 1]] = block.t()
    save_safetensors_atomic({"token_index": torch.cat(indices), "similarity": similarity}, out)
    stage.finish()
    return out


def load_similarity(output_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(output_dir) / SIMILARITY_DIR / "similarity.safetensors"
    if stage_fingerprint(path.parent, SIMILARITY_STAGE) is None or not path.exists():
        raise FileNotFoundError(
            f"{path.parent}: no finished similarity matrix; run `hfx quanta similarity` first."
        )
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor("token_index"), handle.get_tensor("similarity")


def angular_affinity(similarity: torch.Tensor) -> torch.Tensor:
    """1 - arccos(C) / pi: a non-negative affinity for spectral clustering."""
    return 1.0 - torch.arccos(similarity.clamp(-1.0, 1.0)) / math.pi
