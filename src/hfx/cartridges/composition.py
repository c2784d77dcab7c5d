"""Composition of k >= 2 cartridges: their KV prefixes concatenated, one after the other.

A cartridge is a per-layer KV prefix, so cartridges trained on different documents compose by concatenation along
the token axis (the model attends to all of them at once). On disk this is PEFT's ``compose_cartridge_adapters``
(any number of adapters); in memory it is :meth:`PrefixKV.concat` of the loaded prefixes. Before either, every
cartridge is checked to fit the base model (shape) and to have been trained on the same base model (hfx metadata).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import compose_cartridge_adapters
from peft.utils import load_peft_weights

from hfx.cartridges.prefix import PrefixKV
from hfx.cartridges.training import METADATA_FILE, check_cartridge_fits, read_metadata


def check_same_base(
    adapter_dirs: list[str | Path], model_config=None, base_model: str | None = None
) -> str | None:
    """Check the cartridges can be composed on one model; return their base model's name (if recorded).

    Raises ``ValueError`` naming the offending cartridge when one does not fit ``model_config`` (shape) or was
    trained on another base model than ``base_model`` / the first cartridge.
    """
    if len(adapter_dirs) < 1:
        raise ValueError("No cartridges given.")
    expected = base_model
    expected_from = "the base model in use" if base_model else None
    for adapter_dir in adapter_dirs:
        if model_config is not None:
            check_cartridge_fits(adapter_dir, model_config)
        elif not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; not a saved cartridge.")
        trained_on = read_metadata(adapter_dir).get("base_model")
        if trained_on is None:
            continue
        if expected is None:
            expected, expected_from = trained_on, str(adapter_dir)
        elif trained_on != expected:
            raise ValueError(
                f"{adapter_dir}: this cartridge was trained on {trained_on!r}, but {expected_from} is "
                f"{expected!r}; cartridges only work on the base model they were trained on."
            )
    return expected


def load_prefix(adapter_dir: str | Path, dtype: torch.dtype | None = None) -> PrefixKV:
    """A saved cartridge's KV prefix, read straight from its weights (no PEFT model wrapping needed)."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter_dir))
    try:
        weights = load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file is a corrupt cartridge for the user
        raise ValueError(
            f"{adapter_dir}: the cartridge's weights cannot be read ({type(err).__name__}: {err})."
        ) from None
    if "prompt_embeddings" not in weights:
        raise ValueError(f"{adapter_dir}: the weights have no 'prompt_embeddings' tensor; not a cartridge.")
    embeddings = weights["prompt_embeddings"]  # [p, num_layers * 2 * token_dim]
    p = embeddings.shape[0]
    heads = config.num_attention_heads
    head_dim = config.token_dim // heads
    expected = config.num_layers * 2 * config.token_dim
    if embeddings.ndim != 2 or embeddings.shape[1] != expected or p != config.num_virtual_tokens:
        raise ValueError(
            f"{adapter_dir}: prompt_embeddings has shape {tuple(embeddings.shape)}, expected "
            f"({config.num_virtual_tokens}, {expected}) from adapter_config.json."
        )
    # PEFT's layout (get_prompt): [p, layers, 2, heads, head_dim] -> per layer [1, heads, p, head_dim].
    kv = embeddings.view(p, config.num_layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    if dtype is not None:
        kv = kv.to(dtype)
    keys = [kv[2 * i].unsqueeze(0).contiguous() for i in range(config.num_layers)]
    values = [kv[2 * i + 1].unsqueeze(0).contiguous() for i in range(config.num_layers)]
    return PrefixKV(keys, values)


def composed_prefix(
    adapter_dirs: list[str | Path], model_config=None, base_model: str | None = None, dtype=None
) -> PrefixKV:
    """The KV prefix of ``adapter_dirs`` composed in order, checked against the model first."""
    check_same_base(adapter_dirs, model_config, base_model)
    return PrefixKV.concat([load_prefix(d, dtype=dtype) for d in adapter_dirs])


def compose_cartridges(
    adapter_dirs: list[str | Path], output_dir: str | Path, model_config=None, base_model: str | None = None
) -> Path:
    """Write the composition of ``adapter_dirs`` (k >= 2) as one CARTRIDGE adapter in ``output_dir``.

    The adapter is PEFT's (``compose_cartridge_adapters``), so ``PeftModel.from_pretrained`` loads it like any
    cartridge; ``hfx_cartridge.json`` records the parts. Written to a temp folder and renamed into place.
    """
    if len(adapter_dirs) < 2:
        raise ValueError(f"Composition needs at least 2 cartridges, got {len(adapter_dirs)}.")
    base = check_same_base(adapter_dirs, model_config, base_model)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; choose another output folder.")
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    compose_cartridge_adapters([str(d) for d in adapter_dirs], output_path=str(tmp))
    parts = [read_metadata(d) for d in adapter_dirs]
    metadata = {
        "base_model": base,
        "corpus": " + ".join(
            str(m.get("corpus", Path(d).name)) for m, d in zip(parts, adapter_dirs, strict=True)
        ),
        "composed_from": [
            {"path": str(d), "corpus": m.get("corpus"), "num_virtual_tokens": m.get("num_virtual_tokens")}
            for m, d in zip(parts, adapter_dirs, strict=True)
        ],
        "num_virtual_tokens": sum(
            int(json.loads((Path(d) / "adapter_config.json").read_text())["num_virtual_tokens"])
            for d in adapter_dirs
        ),
    }
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    if output_dir.exists():
        output_dir.rmdir()
    os.replace(tmp, output_dir)
    return output_dir
