"""The one loader of causal LMs, and the one place a process's device and dtype are decided.

``load_causal_lm(name_or_path, device=..., dtype=...)`` takes the embedded model (``None``/``"embedded"``), a local
folder or a Hub id (when online) and returns ``(model, tokenizer)`` in eval mode on the resolved device:

* device: ``None``/``"auto"`` is accelerate's ``PartialState().device`` (CUDA, XPU, MPS or CPU; under
  ``accelerate launch`` each process its own GPU). An explicit ``"cuda"`` keeps the process's own GPU index;
  ``"cuda:1"``, ``"cpu"``, ``"mps"``, ``"xpu"`` are taken as given once they are checked to exist.
* dtype: ``"auto"`` is bfloat16 on a GPU that supports it and float32 elsewhere (the CPU too, unless asked).
  An explicit dtype the device cannot run stops with an error before anything is loaded.

Every command's device and dtype options come from :class:`DeviceArguments`, and every system loads through here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from hfx import embedded

logger = logging.getLogger(__name__)

#: Names accepted for ``--dtype`` (and the torch dtype each means); "auto" is resolved per device.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEVICE_TYPES = ("cuda", "xpu", "mps", "cpu")


@dataclass
class DeviceArguments:
    """``--device`` / ``--dtype`` of every command that runs a model."""

    device: str | None = field(
        default=None,
        metadata={
            "help": "Device to run on: cuda, cuda:N, xpu, mps or cpu (default: this process's accelerator as "
            "accelerate sees it, else the CPU; under `accelerate launch` each process its own GPU)."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "float32, bfloat16 or float16; auto = bfloat16 on a GPU that supports it, else float32."
        },
    )


def _device_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    if device_type == "mps":
        return torch.backends.mps.is_available()
    return False


def process_state():
    """accelerate's ``PartialState`` of this process: its rank, the number of processes, its device.

    Under ``accelerate launch --cpu`` (or on a machine with no accelerator) processes started by a distributed
    launcher join as CPU processes over gloo; without this they would each run alone as process 0 of 1."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    no_accelerator = not any(_device_available(kind) for kind in ("cuda", "xpu", "mps"))
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or no_accelerator)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a process runs on: ``device`` when given (checked), else accelerate's device of this process."""
    if device is None or str(device) in ("", "auto"):
        return process_state().device
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"--device {device!r} is not a device; use one of {', '.join(DEVICE_TYPES)} (cuda:N for one GPU)."
        ) from error
    if resolved.type not in DEVICE_TYPES:
        raise ValueError(f"--device {device!r}: hfx runs on {', '.join(DEVICE_TYPES)}, not {resolved.type}.")
    if not _device_available(resolved.type):
        raise ValueError(
            f"--device {device!r} was asked for, but this machine has no {resolved.type.upper()} device that "
            f"torch {torch.__version__} can use. Run with --device cpu, or leave --device unset to use what "
            "accelerate finds."
        )
    if resolved.type in ("cuda", "xpu"):
        if resolved.index is None:
            process_device = process_state().device
            # Under `accelerate launch` a bare "cuda" means this process's own GPU, not GPU 0 for everyone.
            return process_device if process_device.type == resolved.type else torch.device(resolved.type, 0)
        count = torch.cuda.device_count() if resolved.type == "cuda" else torch.xpu.device_count()
        if resolved.index >= count:
            raise ValueError(f"--device {device!r}: this machine has {count} {resolved.type} device(s).")
    return resolved


def supports_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (the CPU does, through PyTorch's kernels)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "xpu":
        return torch.xpu.is_bf16_supported()
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return False
        return True
    return True


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively, so that they are faster than float32.

    A GPU that supports bfloat16 does; a CPU does when it has AVX512-BF16 or AMX (without them PyTorch converts, and
    a bfloat16 training step of the embedded model takes about 2.5x a float32 one).
    """
    if device.type == "cpu":
        return any(
            getattr(torch.cpu, name, lambda: False)()
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return supports_bfloat16(device)


def resolve_training_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The frozen base's dtype while a small adapter trains: "auto" is bfloat16 where :func:`native_bfloat16`, else
    float32; anything else as :func:`resolve_dtype`."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return resolve_dtype(dtype, device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The torch dtype for ``dtype`` on ``device``: "auto" fits the device; an unsupported choice is refused."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype is None or dtype == "auto":
        if device.type in ("cuda", "xpu") and supports_bfloat16(device):
            return torch.bfloat16
        return torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}.")
    if resolved == torch.bfloat16 and not supports_bfloat16(device):
        raise ValueError(
            f"--dtype bfloat16 was asked for, but {device} does not support bfloat16 "
            f"({_device_name(device)}). Use --dtype float16 or float32."
        )
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"--dtype must be a floating point type, got {resolved}.")
    return resolved


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what manifests and cards record)."""
    return str(dtype).removeprefix("torch.")


def resolve(device: str | None = None, dtype: str | None = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a command, checked before any work is done."""
    resolved_device = resolve_device(device)
    return resolved_device, resolve_dtype(dtype, resolved_device)


def load_causal_lm(
    name_or_path: str | None = "embedded",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
):
    """(model in eval mode on the resolved device and dtype, tokenizer with a pad token) of a causal LM.

    ``None``/``"embedded"`` is the embedded SmolLM2-135M-Instruct; anything else is a local folder or a Hub id.
    Device and dtype are checked before the weights are read. Attention goes through hfx's grouped SDPA, which
    skips transformers' per-head KV copy on the CPU and calls transformers' own SDPA on every other device.
    """
    return load_model(name_or_path, device=device, dtype=dtype), load_tokenizer(name_or_path)


def load_model(
    name_or_path: str | None = "embedded",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
):
    """The model of :func:`load_causal_lm` alone (for a caller that has its tokenizer already)."""
    from transformers import AutoModelForCausalLM

    from hfx.attention import use_grouped_sdpa

    resolved_device, resolved_dtype = resolve(device, dtype)
    path = embedded.resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolved_dtype).to(resolved_device).eval()
    use_grouped_sdpa(model)
    logger.info("Loaded %s on %s in %s", model_id(name_or_path), resolved_device, dtype_name(resolved_dtype))
    return model


def load_tokenizer(name_or_path: str | None = "embedded"):
    """The tokenizer of a causal LM (``None``/``"embedded"``: the embedded model's), with a pad token: the one
    tokenizer loader of hfx (:func:`load_causal_lm` uses it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded.resolve_model_path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_device(device: str | torch.device | None, training_args) -> torch.device:
    """The device Trainer trains this process on (``training_args.device``), which ``--device``, when given, must name.

    Trainer picks its device itself (the process's accelerator, or the CPU with ``--use_cpu true``), so a different
    ``--device`` is refused, naming the option that moves Trainer, rather than silently ignored; checked before any
    work is done."""
    asked = None if device is None or str(device) in ("", "auto") else resolve_device(device)
    trained_on = training_args.device
    if asked is not None and (asked.type, asked.index or 0) != (trained_on.type, trained_on.index or 0):
        fix = (
            "add --use_cpu true to train on the CPU"
            if asked.type == "cpu"
            else "choose the GPU with CUDA_VISIBLE_DEVICES or `accelerate launch`"
        )
        raise ValueError(f"--device {str(device)!r}: Trainer trains this process on {trained_on}; {fix}.")
    return trained_on


def model_id(name_or_path: str | None) -> str:
    """The name to record for a model: the embedded model's Hub id, or what was given."""
    if name_or_path in (None, "", "embedded", embedded.EMBEDDED_MODEL_ID, embedded.EMBEDDED_MODEL_NAME):
        return embedded.EMBEDDED_MODEL_ID
    if str(name_or_path) == str(embedded.cache_dir() / "models" / embedded.EMBEDDED_MODEL_NAME):
        return embedded.EMBEDDED_MODEL_ID
    return str(name_or_path)


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside, torch's global generators (the CPU's and ``device``'s) start from ``seed``; after, the caller's
    state is back as it was. For library code whose draws come from the global generator (``generate``'s
    sampling, PEFT's initializations): reproducible without seeding the caller's program."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    forked = [] if device.type == "cpu" else [device.index or 0]
    device_type = "cuda" if device.type == "cpu" else device.type
    with torch.random.fork_rng(devices=forked, device_type=device_type):
        torch.manual_seed(seed)
        yield


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock timer around it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
