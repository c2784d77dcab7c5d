"""On-disk pieces shared by the pipelines: atomic Parquet shards and safetensors files, shard names, and the
refusal of non-finite results. What makes a folder, and what a rerun does with it, is :mod:`hfx.stages`."""

from __future__ import annotations

from pathlib import Path

from hfx.atomic import atomic_file, write_text_atomic


def require_finite(values, what: str) -> None:
    """Raise ``ValueError`` when ``values`` (a tensor, or numbers) hold NaN or infinity: a result that is about to
    be written is refused whole, before anything of it reaches the disk. ``what`` names it in the error."""
    import torch

    values = torch.as_tensor(values)
    if values.is_floating_point() or values.is_complex():
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            first = [int(i) for i in torch.nonzero(bad)[0]]
            raise ValueError(
                f"{what}: {int(bad.sum())} of {values.numel()} values are not finite (the first at index {first}); "
                "nothing was written. On a GPU in bfloat16 this comes from the model or its attention: run it in "
                "float32 (--dtype float32) to see whether it persists."
            )


def write_parquet_atomic(rows: list[dict], features, path: str | Path) -> None:
    """Write rows as one Parquet file with explicit `datasets.Features`, through a temp name and a rename."""
    import datasets

    with atomic_file(path) as tmp:
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp))


def save_safetensors_atomic(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` through a temp name and a rename."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_figure_atomic(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG through a temp name and a rename."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def shard_path(directory: str | Path, prefix: str, index: int) -> Path:
    """`directory/data/<prefix>-00000.parquet`: the name of shard `index` of a sharded Parquet dataset."""
    return Path(directory) / "data" / f"{prefix}-{index:05d}.parquet"


def shard_rows(items: list[dict], index: int, per_shard: int) -> list[dict]:
    """Copies of the rows that belong to shard `index`."""
    return [dict(item) for item in items[index * per_shard : (index + 1) * per_shard]]


def shard_files(directory: str | Path, prefix: str, hint: str, what: str | None = None) -> list[Path]:
    """The `<prefix>-*.parquet` shards of `directory/data` in order; `FileNotFoundError` (saying how to make them,
    `hint`) when there are none. `what` names them in the error (default: "<prefix> shards")."""
    files = sorted((Path(directory) / "data").glob(f"{prefix}-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{directory}: no {what or prefix + ' shards'} (data/{prefix}-*.parquet); {hint}."
        )
    return files


def check_parquet_columns(path: str | Path, features, what: str = "the dataset") -> list[str]:
    """The Parquet file's column names; `ValueError` naming the file when it is not Parquet (truncated, foreign)
    or lacks a column of `features`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as err:  # a truncated or foreign file
        raise ValueError(f"{path}: cannot be read as Parquet ({type(err).__name__}: {err}).") from err
    missing = [name for name in features if name not in columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)}; {what} has the columns {', '.join(features)}."
        )
    return columns


def load_parquet_shards(
    directory: str | Path,
    prefix: str,
    features,
    hint: str,
    shards_what: str | None = None,
    dataset_what: str | None = None,
):
    """All `<prefix>-*.parquet` shards of `directory/data` as one dataset, each checked to be Parquet with the
    columns of `features`; `hint` says how to make them. Errors name the shards `shards_what` and the dataset
    `dataset_what`."""
    import datasets

    files = shard_files(directory, prefix, hint, shards_what)
    for path in files:
        check_parquet_columns(path, features, dataset_what or f"a {prefix} dataset")
    return datasets.Dataset.from_parquet([str(p) for p in files], features=features)


def replace_pickled_training_args(output_dir: str | Path, args) -> None:
    """Trainer pickles its arguments next to the weights (`training_args.bin`); hfx artifacts carry them as JSON."""
    output_dir = Path(output_dir)
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    write_text_atomic(output_dir / "training_args.json", args.to_json_string())
