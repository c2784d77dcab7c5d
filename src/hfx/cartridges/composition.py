"""Composition of k >= 2 cartridges: their KV prefixes concatenated, one after the other.

A cartridge is a per-layer KV prefix, so cartridges trained on different documents compose by concatenation along
the token axis (the model attends to all of them at once). On disk this is PEFT's ``compose_cartridge_adapters``
(any number of adapters); in memory it is :meth:`PrefixKV.concat` of the loaded prefixes. Before either, every
cartridge is checked to fit the base model (shape) and to have been trained on the same base model (hfx metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import compose_cartridge_adapters
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from hfx.atomic import atomic_folder
from hfx.cartridges.prefix import PrefixKV
from hfx.cartridges.training import (
    METADATA_FILE,
    check_cartridge_fits,
    check_cartridge_weights,
    prompt_width,
    read_metadata,
)


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


def load_prefix(
    adapter_dir: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> PrefixKV:
    """A saved cartridge's KV prefix, read straight from its weights (no PEFT model wrapping needed), in
    ``dtype`` on ``device`` (those of the model it feeds)."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter_dir))
    p, width = check_cartridge_weights(adapter_dir, config.num_virtual_tokens, prompt_width(config))
    embeddings = load_file(Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME)["prompt_embeddings"]  # [p, width]
    prefix = prefix_from_embeddings(
        embeddings.to(device=device), config.num_layers, config.num_attention_heads, dtype=dtype
    )
    return PrefixKV([k.contiguous() for k in prefix.keys], [v.contiguous() for v in prefix.values])


def prefix_from_embeddings(
    embeddings: torch.Tensor, num_layers: int, num_heads: int, dtype: torch.dtype | None = None
) -> PrefixKV:
    """The KV prefix a CARTRIDGE adapter's ``prompt_embeddings`` ``[p, layers * 2 * heads * head_dim]`` feeds the
    model, as views of it (differentiable: a cartridge being trained), in ``dtype``."""
    p = embeddings.shape[0]
    head_dim = embeddings.shape[1] // (num_layers * 2 * num_heads)
    # PEFT's layout (get_prompt): [p, layers, 2, heads, head_dim] -> per layer [1, heads, p, head_dim].
    kv = embeddings.view(p, num_layers * 2, num_heads, head_dim).permute(1, 2, 0, 3)
    if dtype is not None:
        kv = kv.to(dtype)
    return PrefixKV(
        [kv[2 * i].unsqueeze(0) for i in range(num_layers)],
        [kv[2 * i + 1].unsqueeze(0) for i in range(num_layers)],
    )


def save_prefix(
    prefix: PrefixKV, folder: str | Path, base_model: str | None = None, metadata: dict | None = None
) -> Path:
    """Write a KV prefix into ``folder`` as a CARTRIDGE adapter (PEFT's config and weights, hfx's metadata), each
    file atomically: the inverse of :func:`load_prefix`, for prefixes made without training (a library's initial
    cartridges)."""
    from peft import CartridgeConfig
    from safetensors.torch import save_file

    from hfx.atomic import atomic_file, write_text_atomic

    folder = Path(folder)
    heads, p, head_dim = prefix.keys[0].shape[1:]
    config = CartridgeConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=p,
        num_layers=len(prefix.keys),
        token_dim=heads * head_dim,
        num_attention_heads=heads,
        num_transformer_submodules=1,
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    # PEFT's layout (load_prefix's, reversed): per layer [1, heads, p, head_dim] -> [p, layers * 2 * heads * head_dim]
    kv = torch.stack([t[0] for pair in zip(prefix.keys, prefix.values, strict=True) for t in pair])
    embeddings = kv.permute(2, 0, 1, 3).reshape(p, -1).float().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / SAFETENSORS_WEIGHTS_NAME) as tmp:
        save_file({"prompt_embeddings": embeddings}, str(tmp))
    write_text_atomic(folder / "adapter_config.json", json.dumps(config.to_dict(), indent=2, default=list))
    write_text_atomic(
        folder / METADATA_FILE,
        json.dumps({"base_model": base_model, "num_virtual_tokens": p, **(metadata or {})}, indent=2),
    )
    return folder


def composed_prefix(
    adapter_dirs: list[str | Path],
    model_config=None,
    base_model: str | None = None,
    dtype=None,
    device: torch.device | str | None = None,
) -> PrefixKV:
    """The KV prefix of ``adapter_dirs`` composed in order, checked against the model first."""
    check_same_base(adapter_dirs, model_config, base_model)
    return PrefixKV.concat([load_prefix(d, dtype=dtype, device=device) for d in adapter_dirs])


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
    with atomic_folder(output_dir) as tmp:
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
    return output_dir


def _question_groups(questions_path: str | Path) -> list[tuple[str, ...] | None]:
    """The optional ``documents`` field of each question (which documents it needs), in file order."""
    groups = []
    for line in Path(questions_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            documents = json.loads(line).get("documents")
            groups.append(tuple(documents) if documents else None)
    return groups


def check_question_documents(questions_path: str | Path, names: list[str]) -> list[tuple[str, ...] | None]:
    """The document groups of the questions; a document no cartridge was trained on is an error."""
    groups = _question_groups(questions_path)
    unknown = sorted({d for g in groups if g for d in g} - set(names))
    if unknown:
        raise ValueError(
            f"{questions_path}: questions name documents {unknown} that none of the cartridges ({names}) was trained on."
        )
    return groups


def evaluate_composition(
    model,
    tokenizer,
    cartridge_dirs: list[str | Path],
    documents: list[tuple[str, str]],
    questions_path: str | Path,
    base_model: str | None = None,
    max_context_tokens: int | None = None,
    throughput_batch: int = 8,
    throughput_tokens: int = 32,
    progress: bool = True,
) -> dict:
    """Composed vs single cartridges vs ICL with every document, on questions that need several documents.

    ``documents`` are ``(name, text)`` pairs, one per cartridge in the same order (the name is the corpus name
    recorded in the cartridge). Questions may name the documents they need (``"documents": ["rcv1", "iris"]``);
    each such group is also scored separately, with the composition of just its cartridges as an extra condition.
    """
    from hfx.cartridges.evaluation import (
        Condition,
        evaluate_conditions,
        icl_condition,
        load_questions,
        score_multiple_choice,
    )

    if len(cartridge_dirs) != len(documents):
        raise ValueError(
            f"{len(cartridge_dirs)} cartridges but {len(documents)} documents; give one per cartridge."
        )
    check_same_base(cartridge_dirs, model.config, base_model)
    questions = load_questions(questions_path)
    names = [name for name, _ in documents]
    groups = check_question_documents(questions_path, names)
    prefixes = {
        name: load_prefix(d, dtype=model.dtype, device=model.device)
        for name, d in zip(names, cartridge_dirs, strict=True)
    }
    composed = PrefixKV.concat(list(prefixes.values()))
    conditions = [
        Condition("no context", None, prompt_after_system=False),
        icl_condition(model, tokenizer, "\n\n".join(text for _, text in documents), max_context_tokens),
        *[Condition(f"cartridge {name} (p={p.num_tokens})", p, False) for name, p in prefixes.items()],
        Condition(f"composed {len(names)} cartridges (p={composed.num_tokens})", composed, False),
    ]
    truncated = conditions[1].name != "ICL"  # icl_condition names a cut document "ICL (first N tokens)"
    conditions[
        1
    ].name = f"ICL, all {len(names)} documents ({'first ' if truncated else ''}{conditions[1].prefix.num_tokens} tokens)"
    results = evaluate_conditions(
        model,
        tokenizer,
        conditions,
        questions,
        throughput_batch=throughput_batch,
        throughput_tokens=throughput_tokens,
        progress=progress,
    )
    by_group: dict[str, dict[str, float]] = {}
    for group in sorted({g for g in groups if g}):
        subset = [q for q, g in zip(questions, groups, strict=True) if g == group]
        pair = PrefixKV.concat([prefixes[name] for name in group])
        label = " + ".join(group)
        scores = {}
        for condition in [
            *conditions,
            Condition(f"composed {label} (p={pair.num_tokens})", pair, False),
        ]:
            accuracy, _ = score_multiple_choice(model, tokenizer, condition, subset, progress=False)
            scores[condition.name] = accuracy
        by_group[label] = {"num_questions": len(subset), "accuracy": scores}
    from hfx.cartridges.evaluation import results_to_json

    return {"results": results_to_json(results), "by_group": by_group, "num_questions": len(questions)}


def format_composition_table(report: dict) -> str:
    """Markdown: one row per condition, overall accuracy, accuracy per document group, KV size."""
    from hfx.cartridges.evaluation import format_bytes

    groups = list(report["by_group"])
    header = "| condition | accuracy (all) | " + " | ".join(groups) + " | KV tokens | KV bytes |"
    lines = [header, "|" + "---|" * (4 + len(groups))]
    for result in report["results"]:
        cells = [
            f"{report['by_group'][g]['accuracy'].get(result['condition'], float('nan')):.3f}" for g in groups
        ]
        lines.append(
            f"| {result['condition']} | {result['accuracy']:.3f} | "
            + " | ".join(cells)
            + f" | {result['kv_tokens']} | {format_bytes(result['kv_bytes'])} |"
        )
    for g in groups:
        for name, accuracy in report["by_group"][g]["accuracy"].items():
            if name.startswith(f"composed {g} "):
                cells = [f"{accuracy:.3f}" if other == g else "—" for other in groups]
                lines.append(f"| {name} | — | " + " | ".join(cells) + " | — | — |")
    counts = ", ".join(f"{g}: {report['by_group'][g]['num_questions']}" for g in groups)
    lines.append(f"\n{report['num_questions']} multiple-choice questions ({counts}).")
    return "\n".join(lines)
