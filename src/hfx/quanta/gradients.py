"""Per-token loss gradients, computed once each and batched.

Each kept token becomes one row of a batch: its context window (left-padded) whose last position predicts it.
Rows are independent, so one backward of the summed row losses gives every row's own backprop signal at every
position, and the per-token gradient of a linear layer is exactly G = sum_t delta_t x_t^T (the per-example
gradient identity). Hooks capture the layer inputs x and the gradients delta at the layer outputs (no weight
gradient is ever formed).

Each selected layer's gradient is either kept whole (`projection_dim=0`, exact) or sketched to `projection_dim`
= m numbers by a seeded Khatri-Rao Gaussian projection: row j is r_j (x) s_j with r_j, s_j ~ N(0, I), so
sketch_j = sum_t (r_j . delta_t)(s_j . x_t) / sqrt(m), computed from R delta and S x without forming G. It is an
unbiased Johnson-Lindenstrauss sketch (E <sketch(G), sketch(H)> = <G, H>) whose variance is at most four times a
dense Gaussian projection's of the same size, and memory grows with the number of layers, not parameters.

Everything runs on the device of the model, the projection matrices too: they are drawn there by a generator
seeded from (seed, layer), once, when the object is made (on a GPU in milliseconds; drawn on the CPU they took
longer than the gradients). The same seed gives the same sketch on the same kind of device; a CPU and a GPU draw
other numbers, so a sketched run records where its projections were drawn (``GradientSpec.projection_device``) and
resumes only on that kind of device. The exact mode (``projection_dim=0``) has no randomness at all.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hfx.batching import left_padded

logger = logging.getLogger(__name__)

DEFAULT_PARAMETERS = "all linear layers except the output head"


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers' GPT-2 style layer


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.nf  # Conv1D: weight (in, out)


def select_layers(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Module]:
    """The layers whose weight gradients make up a token's gradient.

    Default: every linear layer except the output head (embeddings and norms are not linear layers, so they are
    excluded too). `pattern` is a regular expression matched (re.search) against module names; it must select
    only linear layers (nn.Linear or transformers' Conv1D)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected = {}
    for name, module in model.named_modules():
        if pattern is None:
            if _is_linear(module) and module is not head:
                selected[name] = module
        elif name and re.search(pattern, name) and module is not model:
            if not list(module.children()) or _is_linear(module):
                if not _is_linear(module):
                    if any(p.requires_grad for p in module.parameters(recurse=False)):
                        raise ValueError(
                            f"--parameters {pattern!r} selects {name} ({type(module).__name__}); only linear layers "
                            "(nn.Linear, Conv1D) are supported. Narrow the pattern."
                        )
                    continue
                selected[name] = module
    if not selected:
        examples = [n for n, m in model.named_modules() if _is_linear(m)][:5]
        what = DEFAULT_PARAMETERS if pattern is None else f"pattern {pattern!r}"
        raise ValueError(
            f"{type(model).__name__} has no parameters matching {what}. Linear layers in this model look like: "
            f"{examples or 'none'}."
        )
    return selected


@dataclass
class GradientSpec:
    """What a gradient row is made of: selected layers, sketch size per layer (0 = exact) and seed."""

    layers: list[str]
    projection_dim: int
    seed: int
    dims: list[int]  # row width contributed by each layer
    #: Device type the projections were drawn on ("cpu", "cuda", ...; "" when exact): another draws other numbers.
    projection_device: str = ""

    @property
    def width(self) -> int:
        return sum(self.dims)


class PerTokenGradients:
    """Computes per-token gradients of selected linear layers for batches of (context, target) rows.

    Use as: `grads = PerTokenGradients(model, projection_dim=256, seed=0)`; `rows = grads(batch_contexts,
    batch_targets)` -> (B, width) float32 on the model's device, not normalised."""

    def __init__(
        self,
        model: nn.Module,
        projection_dim: int = 256,
        seed: int = 0,
        parameters: str | None = None,
    ):
        if projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0 = exact), got {projection_dim}.")
        self.model = model
        self.layers = select_layers(model, parameters)
        self.projection_dim = projection_dim
        self.seed = seed
        device = next(model.parameters()).device
        # (R, S) of each layer, on the model's device. Layers of one shape are sketched together: their
        # projections live stacked, one stack per shape, each layer's pair a view of its group's stack (drawn in
        # place, by the layer's own generator), so no batch copies them.
        self.projections = {}
        shapes: dict[tuple[int, int], list[str]] = {}
        for name, module in self.layers.items():
            shapes.setdefault(_in_out(module), []).append(name)
        if projection_dim:
            for (fan_in, fan_out), names in shapes.items():
                stacked = (
                    torch.empty(len(names), projection_dim, fan_out, device=device),
                    torch.empty(len(names), projection_dim, fan_in, device=device),
                )
                self._stacked[(tuple(names), str(device))] = stacked
                for position, name in enumerate(names):
                    self._projections[name] = (stacked[0][position], stacked[1][position])
        dims = []
        for index, (name, module) in enumerate(self.layers.items()):
            fan_in, fan_out = _in_out(module)
            has_bias = getattr(module, "bias", None) is not None
            if projection_dim:
                generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
                r_out, r_in = self._projections[name]
                torch.randn(r_out.shape, generator=generator, device=device, out=r_out)
                torch.randn(r_in.shape, generator=generator, device=device, out=r_in)
                dims.append(projection_dim * (2 if has_bias else 1))
            else:
                dims.append(fan_out * fan_in + (fan_out if has_bias else 0))
        self.spec = GradientSpec(
            list(self.layers), projection_dim, seed, dims, device.type if projection_dim else ""
        )
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}

    def _hooks(self) -> list:
        handles = []
        for name, module in self.layers.items():

            def forward_hook(module, args, output, name=name):
                if name in self._outputs:
                    raise RuntimeError(
                        f"{name} runs more than once per forward; shared layers are not supported."
                    )
                self._inputs[name] = args[0].detach()
                self._outputs[name] = output

            handles.append(module.register_forward_hook(forward_hook))
        return handles

    def __call__(self, contexts: list[list[int]], targets: list[int]) -> torch.Tensor:
        """Gradient rows for `targets[b]` predicted after `contexts[b]` (each context at least one token)."""
        if any(len(c) == 0 for c in contexts):
            raise ValueError("every target needs at least one context token")
        device = next(self.model.parameters()).device
        input_ids, mask, position_ids = left_padded(
            contexts, device
        )  # every row predicts at the last position
        target_ids = torch.tensor(targets, device=device)
        handles = self._hooks()
        was_training = self.model.training
        self.model.eval()
        # The layers' outputs need a graph for their gradients: frozen weights take part for this call only.
        frozen = [m.weight for m in self.layers.values() if not m.weight.requires_grad]
        for weight in frozen:
            weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                logits = self._last_logits(input_ids, mask, position_ids)
                loss = torch.nn.functional.cross_entropy(logits.float(), target_ids, reduction="sum")
                # Gradients with respect to the layer outputs only: no weight gradients are formed.
                names = list(self._outputs)
                deltas = torch.autograd.grad(loss, [self._outputs[n] for n in names], allow_unused=True)
            return self._rows(len(contexts), dict(zip(names, deltas, strict=True)))
        finally:
            for handle in handles:
                handle.remove()
            self._inputs.clear()
            self._outputs.clear()
            self.model.train(was_training)
            for weight in frozen:
                weight.requires_grad_(False)

    def _last_logits(self, input_ids, mask, position_ids) -> torch.Tensor:
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        try:
            out = self.model(**kwargs, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = self.model(**kwargs)
        return out.logits[:, -1]

    @property
    def projections(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(R, S) of each layer: R is ``projection_dim x fan_out``, S ``projection_dim x fan_in``."""
        return self._projections

    @projections.setter
    def projections(self, value: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._projections = value
        self._stacked: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stacked_projections(self, names: tuple[str, ...], device: torch.device):
        """The projections of layers of one shape, stacked (``[layers, m, fan_out]``, ``[layers, m, fan_in]``) on
        ``device``: made once, so each batch sketches a whole group of layers in two batched products."""
        key = (names, str(device))
        stacked = self._stacked.get(key)
        if stacked is None:
            stacked = self._stacked[key] = (
                torch.stack([self._projections[n][0] for n in names]).to(device),
                torch.stack([self._projections[n][1] for n in names]).to(device),
            )
        return stacked

    def _check_deltas(self, deltas: dict[str, torch.Tensor | None]) -> None:
        for name in self.layers:
            if deltas.get(name) is None:
                raise RuntimeError(
                    f"no gradient reaches {name}: it is not on the path from the input to the loss."
                )

    def _rows(self, batch: int, deltas: dict[str, torch.Tensor | None]) -> torch.Tensor:
        self._check_deltas(deltas)
        if self.projection_dim:
            return self._sketched_rows(batch, deltas)
        parts = []
        for name, module in self.layers.items():
            x = self._inputs[name].float().reshape(batch, -1, self._inputs[name].shape[-1])
            delta = deltas[name].float().reshape(batch, -1, deltas[name].shape[-1])
            parts.append(torch.einsum("bto,bti->boi", delta, x).reshape(batch, -1))
            if getattr(module, "bias", None) is not None:
                parts.append(delta.sum(1))
        return torch.cat(parts, dim=1)

    def _sketched_rows(self, batch: int, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """sketch_j = sum_t (R_j . delta_t)(S_j . x_t) / sqrt(m) for every layer, computed for all the layers of
        one shape (the q, k, v, o, gate, up and down projections of every block) in batched products: a few large
        kernels instead of a few small ones per layer (a GPU is otherwise launch-bound here)."""
        groups: dict[tuple, list[str]] = {}
        for name in self.layers:
            key = (self._inputs[name].shape[1:], deltas[name].shape[1:])
            groups.setdefault(key, []).append(name)
        scale = 1.0 / math.sqrt(self.projection_dim)
        sketches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for names in groups.values():
            x = torch.stack([self._inputs[n] for n in names]).float()
            delta = torch.stack([deltas[n] for n in names]).float()
            layers = len(names)
            x = x.reshape(layers, -1, x.shape[-1])  # [layers, batch * tokens, fan_in]
            delta = delta.reshape(layers, -1, delta.shape[-1])
            r_out, r_in = self._stacked_projections(tuple(names), delta.device)
            projected = (delta @ r_out.transpose(1, 2)).reshape(layers, batch, -1, self.projection_dim)
            inputs = (x @ r_in.transpose(1, 2)).reshape(layers, batch, -1, self.projection_dim)
            weight = (projected * inputs).sum(2) * scale  # [layers, batch, m]
            bias = projected.sum(2) * scale
            for index, name in enumerate(names):
                sketches[name] = (weight[index], bias[index])
        parts = []
        for name, module in self.layers.items():
            weight, bias = sketches[name]
            parts.append(weight)
            if getattr(module, "bias", None) is not None:
                parts.append(bias)
        return torch.cat(parts, dim=1)


def reference_gradients(
    model: nn.Module, contexts: Iterable[list[int]], targets: Iterable[int], parameters: str | None = None
) -> torch.Tensor:
    """The plain approach, for checking and benchmarks: one forward and backward per token, full gradients of the
    selected layers kept and flattened (weight as (out, in), then bias, per layer, in module order)."""
    params, transposed = [], []  # Conv1D stores its weight as (in, out)
    for module in select_layers(model, parameters).values():
        params.append(module.weight)
        transposed.append(not isinstance(module, nn.Linear))
        if getattr(module, "bias", None) is not None:
            params.append(module.bias)
            transposed.append(False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    try:
        for context, target in zip(contexts, targets, strict=True):
            with torch.enable_grad():
                logits = model(input_ids=torch.tensor([context], device=device), use_cache=False).logits[
                    0, -1
                ]
                loss = torch.nn.functional.cross_entropy(
                    logits.float()[None], torch.tensor([target], device=device)
                )
                grads = torch.autograd.grad(loss, params)
            flat = [(g.t() if t else g).reshape(-1) for g, t in zip(grads, transposed, strict=True)]
            rows.append(torch.cat(flat).float())
    finally:
        model.train(was_training)
    return torch.stack(rows)
