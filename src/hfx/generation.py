"""Sampling after a shared KV prefix in a few fixed shapes: the decode loop of synthesis and of decode timing.

``model.generate`` with a ``StaticCache`` compiles its decode step on a GPU, and every synthesis call brings a new
cache length and often a new batch size, so every call compiled again and the cost was never paid back. Here:

* **Buckets.** The batch is rounded up to a size of :func:`bucket` (extra rows repeat the first prompt: no row is
  ever all padding), the prompt width and the cache length too. Calls with different chunk lengths run through the
  same few shapes; a :class:`PrefixDecoder` keeps one cache per (batch, cache length) and reuses it across calls.
* **One step, replayed.** A decode step (forward, the teacher's top-k, sampling, stopping) reads and writes only
  tensors that live as long as the bucket, so on CUDA it is captured once as a CUDA graph and replayed: one launch
  per token instead of hundreds. ``compile=True`` also runs the step through ``torch.compile`` (any device; a CPU
  test uses it to check that nothing recompiles after warm-up).
* **No host sync per token.** The top-k of every row is taken in one call per step into a preallocated buffer,
  rows stop on token ids (not decoded strings), and the loop asks the device whether every row has stopped only
  every ``sync_every`` steps.
* **Attention.** The mask is built here, 4-D, so transformers passes it through untouched; on CUDA the attention
  backend is hfx's (:mod:`hfx.attention`), which never picks cuDNN for masked attention.

:class:`DecodeStats` counts what a test or a benchmark reads: graph captures, compilations, the distinct shapes
the model ran on, host syncs and steps.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

#: Smallest bucket of the cache length, of the prompt width and of the batch.
LENGTH_FLOOR = 64
WIDTH_FLOOR = 8
BATCH_FLOOR = 1


def bucket(n: int, floor: int = 1) -> int:
    """The smallest size ``>= n`` of the ladder ``floor * {1, 2, 3, 4, 6, 8, 12, 16, ...}`` (at most 1.5x ``n``
    beyond ``2 * floor``): few enough sizes that each is warmed up once, close enough that little is wasted."""
    if n < 1:
        raise ValueError(f"Nothing to bucket: {n}.")
    size = floor
    while size < n:
        units = size // floor
        # a power of two of floors is followed by 1.5 times it (from 2 on), 3 * 2^k by 4 * 2^k
        if units & (units - 1) == 0:
            size = floor * (units * 3 // 2 if units >= 2 else 2)
        else:
            size = floor * (units // 3 * 4)
    return size


#: Beyond this many cached tokens the cache length is rounded up to a multiple of :data:`LONG_LENGTH_STEP` instead
#: (a long context is rarely varied, and 1.5x of it would be memory and attention spent on nothing: a 2,048-token
#: cartridge with a prompt and 128 new tokens, about 2,200 cached tokens, would take 3,072 on the ladder, 2,560 here).
LONG_LENGTH = 2048
LONG_LENGTH_STEP = 512


def bucket_length(n: int) -> int:
    """The cache length of ``n`` tokens: :func:`bucket` from :data:`LENGTH_FLOOR` up to :data:`LONG_LENGTH`, then
    multiples of :data:`LONG_LENGTH_STEP`."""
    if n <= LONG_LENGTH:
        return bucket(n, LENGTH_FLOOR)
    return -(-n // LONG_LENGTH_STEP) * LONG_LENGTH_STEP


def bucket_at_most(n: int, floor: int = 1) -> int:
    """The largest size of :func:`bucket`'s ladder that is ``<= n`` (``floor`` when none is)."""
    size = floor
    while bucket(size + 1, floor) <= n:
        size = bucket(size + 1, floor)
    return size


def kv_bytes_per_token(model) -> int:
    """Bytes one token takes in the model's KV cache (keys and values of every layer, in the model's dtype)."""
    config = model.config.get_text_config(decoder=True)
    kv_heads, head_dim = _kv_heads_and_dim(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def _kv_heads_and_dim(config) -> tuple[int, int]:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, head_dim


@dataclass
class DecodeStats:
    """What the decode loop did, for tests and benchmarks."""

    calls: int = 0
    steps: int = 0
    #: ``.item()``-like reads of device values inside decode loops (one per ``sync_every`` steps).
    host_syncs: int = 0
    #: Buckets whose decode step was built (its cache, buffers, and graph or compiled step).
    buckets: int = 0
    #: CUDA graphs captured (one per bucket, at its first use).
    graph_captures: int = 0
    #: Graphs ``torch.compile`` built for the decode step (one per bucket, at its first use).
    compiles: int = 0
    #: Distinct ``(batch, query length, cache length)`` shapes the model ran on.
    shapes: set[tuple[int, int, int]] = field(default_factory=set)

    def snapshot(self) -> dict:
        return {
            "calls": self.calls,
            "steps": self.steps,
            "host_syncs": self.host_syncs,
            "buckets": self.buckets,
            "graph_captures": self.graph_captures,
            "compiles": self.compiles,
            "shapes": len(self.shapes),
        }


@dataclass
class Generated:
    """New tokens per row (cut after its first stop token, which is kept), and the teacher's top-k per new token."""

    token_ids: list[list[int]]
    #: ``[rows, new tokens, k]`` on the CPU, when ``top_k`` was asked for (rows beyond a row's length are padding).
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None


@dataclass
class _Step:
    """The tensors one decode step of a bucket reads and writes: they live as long as the bucket, so a captured
    graph or a compiled step stays valid across calls."""

    cache: object
    tokens: torch.Tensor  # [B, 1] the token fed next
    positions: torch.Tensor  # [B, 1] its position (the cache column it goes to is the cache's own count)
    step: torch.Tensor  # [1] index of the token being chosen
    mask: torch.Tensor  # [B, 1, 1, L] keys each row attends to
    finished: torch.Tensor  # [B]
    stop_ids: torch.Tensor  # [S]
    temperature: torch.Tensor  # [1]
    pad: torch.Tensor  # [1]
    out_tokens: torch.Tensor  # [B, T]
    topk_ids: torch.Tensor | None  # [B, T, k]
    topk_logprobs: torch.Tensor | None
    sample: bool
    graph: object = None
    compiled: object = None


class PrefixDecoder:
    """Batched sampling after one shared prefix, in bucketed shapes, with the teacher's top-k at every new token.

    Use :func:`decoder_for` to share one decoder (its caches and captured graphs) between all the callers of a model.
    ``cuda_graphs`` (default: on CUDA) replays each bucket's step as a CUDA graph; ``compile`` runs the step through
    ``torch.compile`` with ``compile_backend``.
    """

    def __init__(
        self,
        model,
        *,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        sync_every: int = 8,
    ):
        implementation = getattr(model.config, "_attn_implementation", None)
        if str(implementation).startswith(("flash", "flex", "paged")):
            raise ValueError(
                f"PrefixDecoder builds its own 4-D attention mask, which attention {implementation!r} does not take; "
                "load the model with attn_implementation='sdpa' (hfx's loader does)."
            )
        self._model = weakref.ref(model)
        self.cuda_graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and model.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a model on CUDA.")
        self.compile = compile
        self.compile_backend = compile_backend
        self.sync_every = max(1, sync_every)
        self.stats = DecodeStats()
        self._caches: dict[tuple[int, int], object] = {}
        self._steps: dict[tuple, _Step] = {}

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("The model of this PrefixDecoder was freed.")
        return model

    def clear(self) -> None:
        """Free every bucket's cache and graph (they are rebuilt on their next use)."""
        self._caches.clear()
        self._steps.clear()

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prefix,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        pad_token_id: int,
        temperature: float = 0.0,
        stop_token_ids=(),
        top_k: int = 0,
        min_batch: int = 1,
    ) -> Generated:
        """Continue every prompt after ``prefix`` (a :class:`~hfx.cartridges.prefix.PrefixKV` or ``None``).

        ``temperature`` 0 is greedy; otherwise tokens are sampled from ``softmax(logits / temperature)`` with
        torch's global generator of the model's device (seed it with :func:`hfx.models.seeded`). A row stops after
        a token of ``stop_token_ids``. ``top_k`` > 0 also returns the log-probabilities of the ``top_k`` likeliest
        tokens at every new token, from the raw logits (before temperature). The batch is filled up to at least
        ``min_batch`` rows (callers whose batches shrink, as agent B's after empty questions, keep one bucket).
        """
        if not prompts or any(not p for p in prompts):
            raise ValueError("PrefixDecoder.generate needs at least one prompt, and no empty prompt.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        model = self.model
        device = model.device
        rows = len(prompts)
        prefix_len = prefix.num_tokens if prefix is not None else 0
        batch = bucket(max(rows, min_batch), BATCH_FLOOR)
        width = bucket(max(len(p) for p in prompts), WIDTH_FLOOR)
        length = bucket_length(prefix_len + width + max_new_tokens)
        stop_ids = sorted({int(t) for t in stop_token_ids})
        state = self._state(batch, length, max_new_tokens, top_k, temperature > 0, len(stop_ids))
        self.stats.calls += 1

        # Every row of the bucket is a real prompt: the extra rows repeat the first one.
        padded_prompts = list(prompts) + [prompts[0]] * (batch - rows)
        ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(padded_prompts):
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        ids = ids.to(device)
        # Positions and the mask are made on the device (the mask is batch x width x cache length).
        lengths = torch.tensor([len(p) for p in padded_prompts], device=device)
        starts = width - lengths  # first real column of each row
        columns = torch.arange(width, device=device)
        real = columns[None, :] >= starts[:, None]  # [B, W]
        positions = (prefix_len + columns[None, :] - starts[:, None]).clamp(min=prefix_len)
        # Prefill mask [B, 1, W, L]: the prefix, then the row's real prompt tokens up to the query (causal); a
        # padding query attends itself only, so no row of the mask is empty.
        keys = torch.arange(length, device=device)
        key_in_prompt = keys - prefix_len  # prompt column of each key
        prompt_key = (key_in_prompt >= 0) & (key_in_prompt < width)
        key_col = key_in_prompt.clamp(0, width - 1)
        key_real = prompt_key[None, :] & real[:, key_col]  # [B, L]
        causal = key_in_prompt[None, :] <= columns[:, None]  # [W, L]
        allowed = (keys < prefix_len)[None, None, :] | (key_real[:, None, :] & causal[None, :, :])
        allowed |= prompt_key[None, None, :] & (key_in_prompt[None, None, :] == columns[None, :, None])
        prefill_mask = allowed[:, None]

        self._load_prefix(state, prefix, prefix_len)
        for layer in state.cache.layers:
            layer.cumulative_length.fill_(prefix_len)
        state.out_tokens.fill_(pad_token_id)
        state.finished.zero_()
        state.step.zero_()
        state.pad.fill_(pad_token_id)
        state.temperature.fill_(temperature if temperature > 0 else 1.0)
        if stop_ids:
            state.stop_ids.copy_(torch.tensor(stop_ids, dtype=torch.long))

        self.stats.shapes.add((batch, width, length))
        logits = model(
            input_ids=ids,
            attention_mask=_model_mask(prefill_mask, model),
            position_ids=positions,
            past_key_values=state.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        state.mask.copy_(prefill_mask[:, :, -1:, :])
        state.positions.copy_((prefix_len + lengths)[:, None])
        self._choose(state, logits)

        self.stats.shapes.add((batch, 1, length))
        for index in range(1, max_new_tokens):
            if index % self.sync_every == 0:
                self.stats.host_syncs += 1
                if bool(state.finished[:rows].all()):
                    break
            self._run_step(state)
            self.stats.steps += 1

        tokens = state.out_tokens[:rows].cpu()
        stops = torch.isin(tokens, torch.tensor(stop_ids, dtype=torch.long)) if stop_ids else None
        token_ids = []
        for row in range(rows):
            seq = tokens[row].tolist()
            if stops is not None and bool(stops[row].any()):
                seq = seq[: int(stops[row].int().argmax()) + 1]
            token_ids.append(seq)
        result = Generated(token_ids)
        if top_k:
            result.topk_ids = state.topk_ids[:rows].cpu()
            result.topk_logprobs = state.topk_logprobs[:rows].cpu()
        return result

    @torch.no_grad()
    def warm_up(
        self,
        rows: int,
        cache_tokens: tuple[int, int],
        max_new_tokens: int,
        top_k: int = 0,
        sample: bool = True,
        num_stop_ids: int = 0,
    ) -> int:
        """Build now the decode step of every bucket that ``rows`` sequences of ``cache_tokens[0]`` to
        ``cache_tokens[1]`` cached tokens (prefix + prompt + new tokens) can run in, so that no call of that range
        captures or compiles later. Returns how many buckets were new."""
        batch = bucket(rows, BATCH_FLOOR)
        low, high = bucket_length(cache_tokens[0]), bucket_length(cache_tokens[1])
        new, length = 0, low
        while length <= high:
            key = (batch, length, max_new_tokens, top_k, sample, num_stop_ids)
            if key not in self._steps:
                self._state(*key)
                new += 1
            length = bucket_length(length + 1)
        return new

    # ------------------------------------------------------------------------------------------------------------
    def _state(self, batch, length, new_tokens, top_k, sample, num_stop) -> _Step:
        key = (batch, length, new_tokens, top_k, sample, num_stop)
        state = self._steps.get(key)
        if state is not None:
            return state
        model = self.model
        device = model.device
        cache = self._cache(batch, length)
        state = _Step(
            cache=cache,
            tokens=torch.zeros(batch, 1, dtype=torch.long, device=device),
            positions=torch.zeros(batch, 1, dtype=torch.long, device=device),
            step=torch.zeros(1, dtype=torch.long, device=device),
            mask=torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            stop_ids=torch.full((num_stop,), -1, dtype=torch.long, device=device),
            temperature=torch.ones(1, dtype=torch.float32, device=device),
            pad=torch.zeros(1, dtype=torch.long, device=device),
            out_tokens=torch.zeros(batch, new_tokens, dtype=torch.long, device=device),
            topk_ids=torch.zeros(batch, new_tokens, top_k, dtype=torch.long, device=device)
            if top_k
            else None,
            topk_logprobs=torch.zeros(batch, new_tokens, top_k, dtype=torch.float32, device=device)
            if top_k
            else None,
            sample=sample,
        )
        state.mask[..., 0] = True  # a valid step before the first call, for the warm-up and the capture
        if self.compile:
            state.compiled = torch.compile(self._step, backend=self._counting_backend(), dynamic=False)
        if self.cuda_graphs:
            self._capture(state)
        self._steps[key] = state
        self.stats.buckets += 1
        logger.debug(
            "Decode bucket: batch %d, cache %d, %d new tokens, top-%d", batch, length, new_tokens, top_k
        )
        return state

    def _cache(self, batch: int, length: int):
        from transformers import StaticCache

        cache = self._caches.get((batch, length))
        if cache is None:
            model = self.model
            kv_heads, head_dim = _kv_heads_and_dim(model.config.get_text_config(decoder=True))
            cache = StaticCache(config=model.config, max_cache_len=length)
            cache.early_initialization(batch, kv_heads, head_dim, model.dtype, model.device)
            self._caches[(batch, length)] = cache
        return cache

    def _load_prefix(self, state: _Step, prefix, prefix_len: int) -> None:
        if prefix is None:
            return
        batch = state.tokens.shape[0]
        for layer, keys, values in zip(state.cache.layers, prefix.keys, prefix.values, strict=True):
            layer.keys[:, :, :prefix_len].copy_(keys.expand(batch, -1, -1, -1))
            layer.values[:, :, :prefix_len].copy_(values.expand(batch, -1, -1, -1))

    def _choose(self, state: _Step, logits: torch.Tensor) -> None:
        """Record the teacher's top-k, pick the next token of every row, and advance the step's counters."""
        logits = logits.float()
        if state.topk_ids is not None:
            values, ids = torch.log_softmax(logits, dim=-1).topk(state.topk_ids.shape[-1], dim=-1)
            state.topk_ids.index_copy_(1, state.step, ids[:, None])
            state.topk_logprobs.index_copy_(1, state.step, values[:, None])
        if state.sample:
            probs = torch.softmax(logits / state.temperature, dim=-1)
            # argmax of p / E with E ~ Exp(1) is a draw from p, without multinomial's host-side checks
            noise = torch.empty_like(probs).exponential_()
            chosen = (probs / noise).argmax(dim=-1)
        else:
            chosen = logits.argmax(dim=-1)
        chosen = torch.where(state.finished, state.pad, chosen)
        state.out_tokens.index_copy_(1, state.step, chosen[:, None])
        # a broadcast comparison, not torch.isin, whose sorting path may wait on the device
        state.finished |= (chosen[:, None] == state.stop_ids[None, :]).any(dim=-1)
        state.tokens.copy_(chosen[:, None])
        state.step.add_(1)

    def _step(self, state: _Step, model) -> None:
        """One decode step: feed the last chosen token, then choose the next. In place on ``state`` only."""
        # the column the cache writes this token to: its count of tokens so far (the same in every layer)
        state.mask.index_fill_(3, state.cache.layers[0].cumulative_length.reshape(1), True)
        logits = model(
            input_ids=state.tokens,
            attention_mask=_model_mask(state.mask, model),
            position_ids=state.positions,
            past_key_values=state.cache,
            use_cache=True,
        ).logits[:, -1]
        state.positions.add_(1)
        self._choose(state, logits)

    def _run_step(self, state: _Step) -> None:
        if state.graph is not None:
            state.graph.replay()
        elif state.compiled is not None:
            state.compiled(state, self.model)
        else:
            self._step(state, self.model)

    def _capture(self, state: _Step) -> None:
        """Capture the bucket's step as a CUDA graph (after two warm-up steps on a side stream, as CUDA asks)."""
        run = state.compiled if state.compiled is not None else self._step
        model = self.model

        def rewind():  # each run writes one cache column and one output step: keep them in range
            state.step.zero_()
            for layer in state.cache.layers:
                layer.cumulative_length.fill_(0)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                rewind()
                run(state, model)
        torch.cuda.current_stream().wait_stream(stream)
        rewind()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(state, model)
        state.graph = graph
        self.stats.graph_captures += 1

    def _counting_backend(self):
        stats = self.stats
        backend = self.compile_backend

        def count_and_compile(graph_module, example_inputs):
            stats.compiles += 1
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend(backend)(graph_module, example_inputs)

        return count_and_compile


def _model_mask(mask: torch.Tensor, model) -> torch.Tensor:
    """The boolean mask as the model's attention takes it: as is for SDPA, additive for eager attention."""
    if model.config._attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(model.dtype).min
    )


def sequences_in_flight(
    model, cache_tokens: int, top_k: int = 0, limit: int = 256, memory_fraction: float = 0.25
) -> int | None:
    """How many sequences of ``cache_tokens`` cached tokens decode at once in ``memory_fraction`` of the free memory
    of the model's accelerator (their KV cache, and the float32 logits a step makes), as a batch bucket of at most
    ``limit``; None on a CPU or a device whose free memory torch cannot read. A quarter by default: a run keeps one
    cache per bucket it meets (a few cache lengths), and the model's own work needs room too."""
    device = model.device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    vocab_size = model.config.get_text_config(decoder=True).vocab_size
    # logits, their log-softmax and softmax, the sampling noise: a few float32 rows of the vocabulary
    per_row = kv_bytes_per_token(model) * bucket_length(cache_tokens) + 6 * 4 * vocab_size + 16 * top_k
    return bucket_at_most(min(int(free * memory_fraction // per_row), limit), BATCH_FLOOR)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model, **options) -> PrefixDecoder:
    """The :class:`PrefixDecoder` of ``model``, made at its first use and shared by every later caller (so its
    buckets are warmed up once per process); ``options`` apply when it is made."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = PrefixDecoder(model, **options)
        _DECODERS[model] = decoder
    return decoder
