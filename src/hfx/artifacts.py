"""On-disk pieces shared by the pipelines: atomic Parquet shards, atomic safetensors files, and the run manifest
that makes a resumed job refuse an output directory written with other settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hfx.hub import write_text_atomic


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_parquet_atomic(rows: list[dict], features, path: str | Path) -> None:
    """Write rows as one Parquet file with explicit `datasets.Features`, through a temp name and a rename."""
    import datasets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp))
    os.replace(tmp, path)


def save_safetensors_atomic(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` through a temp name and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def check_or_write_manifest(output_dir: str | Path, manifest: dict, filename: str, what: str) -> None:
    """Record the settings of a run in `output_dir/filename`; on resume, refuse if they differ."""
    output_dir = Path(output_dir)
    path = output_dir / filename
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != manifest:
            changed = sorted(k for k in set(existing) | set(manifest) if existing.get(k) != manifest.get(k))
            raise ValueError(
                f"{output_dir} holds a {what} run with different settings ({', '.join(changed)}); "
                "use another output directory or delete it to start over."
            )
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(manifest, indent=2))


def save_figure_atomic(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG through a temp name and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def shard_path(directory: str | Path, prefix: str, index: int) -> Path:
    """`directory/data/<prefix>-00000.parquet`: the name of shard `index` of a sharded Parquet dataset."""
    return Path(directory) / "data" / f"{prefix}-{index:05d}.parquet"


def shard_rows(items: list[dict], index: int, per_shard: int) -> list[dict]:
    """Copies of the rows that belong to shard `index`."""
    return [dict(item) for item in items[index * per_shard : (index + 1) * per_shard]]


def load_parquet_shards(directory: str | Path, prefix: str, features, hint: str):
    """All `<prefix>-*.parquet` shards of `directory/data` as one dataset; `hint` says how to make them."""
    import datasets

    files = sorted(str(p) for p in (Path(directory) / "data").glob(f"{prefix}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory}: no {prefix} shards (data/{prefix}-*.parquet); {hint}.")
    return datasets.Dataset.from_parquet(files, features=features)


def replace_pickled_training_args(output_dir: str | Path, args) -> None:
    """Trainer pickles its arguments next to the weights (`training_args.bin`); hfx artifacts carry them as JSON."""
    from hfx.hub import write_text_atomic

    output_dir = Path(output_dir)
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    write_text_atomic(output_dir / "training_args.json", args.to_json_string())
