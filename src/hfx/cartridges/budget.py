"""A time budget instead of a count: measure this machine, then plan how many conversations and steps fit.

``hfx cartridge run --budget_minutes N`` synthesizes the first batches (they are kept as the run's first shards),
times a few training steps of a cartridge of the run's size on their rows, and solves for the number of
conversations ``C`` that fits::

    setup + C * seconds_per_conversation + ceil(C * epochs / batch) * seconds_per_step + reserve <= N minutes

``reserve`` is what comes after training: evaluation (timed on a few of the questions when the run has them:
:func:`~hfx.cartridges.evaluation.estimate_evaluation_seconds`), the two model reloads (each as long as the run's
first load) and saving; at least ``RESERVE_FRACTION`` of the budget. The plan is logged before the work starts and
written to ``plan.json`` in the run's folder; a resumed run reads it back instead of measuring again, so it does the
same work as the run that was killed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hfx.atomic import write_text_atomic

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
#: Share of the budget kept at least for what comes after training: evaluation, model reloads and saving.
RESERVE_FRACTION = 0.12
#: The timed evaluation and reloads are scaled by this before they replace the share above (a shared machine slows
#: a run, never speeds it up).
RESERVE_MARGIN = 1.25
#: A Trainer step costs more than the probe's forward and backward: the optimizer, checkpoints every
#: ``save_steps``, logging and batches of varying width (measured with the embedded model on 2 CPU cores:
#: 4.2 s per Trainer step against 3.5 s for the probe).
TRAINER_OVERHEAD = 1.2
#: On an accelerator a step is short and the Trainer's own per-step work weighs more: on an H200 (the embedded
#: model's shape, bf16) Trainer steps took 0.136 and 0.144 s against 0.106 s for the probe.
ACCELERATOR_TRAINER_OVERHEAD = 1.4
#: Batches timed by the probe on a CPU and on an accelerator (where the first is left out: it is the first to run
#: the re-scoring and sampling kernels, and batches of mixed kinds vary, so one timed batch is not enough).
PROBE_BATCHES = {"cpu": 2, "accelerator": 3}
#: Batches whose plans (how many of their conversations are generated) pick the decode buckets built before the probe.
WARM_UP_BATCHES = 64


@dataclass
class BudgetPlan:
    """What a budgeted run will do, and the measurements it was planned from."""

    budget_minutes: float
    device: str
    #: dtype of the synthesizing model, and of the frozen base in the timed training step.
    dtype: str
    training_dtype: str
    #: Seconds spent before planning: loading the model and corpus, and the probe itself.
    setup_seconds: float
    seconds_per_conversation: float
    seconds_per_step: float
    reserve_seconds: float
    conversations_per_chunk: int
    per_device_train_batch_size: int
    num_train_epochs: float
    num_conversations: int
    steps: int
    #: Seconds evaluation was timed to take (0 when the run has no questions, or for plans made before it was timed).
    evaluation_seconds: float = 0.0
    #: Distractor tokens beside the cartridge in the average training step (a library's mixing), which the timed
    #: step held frozen before the cartridge (0 for a cartridge trained alone, or plans made before they were timed).
    distractor_tokens: int = 0

    @property
    def planned_seconds(self) -> float:
        return (
            self.setup_seconds
            + self.num_conversations * self.seconds_per_conversation
            + self.steps * self.seconds_per_step
            + self.reserve_seconds
        )

    def describe(self) -> str:
        synthesis = self.num_conversations * self.seconds_per_conversation
        training = self.steps * self.seconds_per_step
        return (
            f"Plan for {self.budget_minutes:g} min on {self.device}: "
            f"{self.num_conversations} conversations ({self.dtype}, {self.seconds_per_conversation:.2f} s each, "
            f"{synthesis / 60:.1f} min), {self.steps} training steps of {self.per_device_train_batch_size} "
            f"({self.training_dtype}, {self.num_train_epochs:g} epochs, {self.seconds_per_step:.2f} s each"
            + (f" beside {self.distractor_tokens} distractor tokens" if self.distractor_tokens else "")
            + f", {training / 60:.1f} min), "
            f"setup {self.setup_seconds / 60:.1f} min, kept for evaluation and saving "
            f"{self.reserve_seconds / 60:.1f} min"
            + (
                f" (evaluation timed at {self.evaluation_seconds / 60:.1f})"
                if self.evaluation_seconds
                else ""
            )
            + f": {self.planned_seconds / 60:.1f} min in all."
        )

    def to_json(self) -> dict:
        return {**asdict(self), "planned_seconds": self.planned_seconds}

    @classmethod
    def from_json(cls, data: dict) -> BudgetPlan:
        return cls(**{k: v for k, v in data.items() if k != "planned_seconds"})


def plan_budget(
    budget_minutes: float,
    setup_seconds: float,
    seconds_per_conversation: float,
    seconds_per_step: float,
    conversations_per_chunk: int,
    per_device_train_batch_size: int,
    num_train_epochs: float,
    min_conversations: int,
    device: str = "cpu",
    dtype: str = "float32",
    training_dtype: str = "float32",
    reserve_fraction: float = RESERVE_FRACTION,
    after_training_seconds: float = 0.0,
    evaluation_seconds: float = 0.0,
    distractor_tokens: int = 0,
) -> BudgetPlan:
    """The largest whole number of batches of conversations (at least ``min_conversations``) that fits the budget.

    ``after_training_seconds`` is what evaluation, reloads and saving were timed to take: the reserve is the larger
    of it (times :data:`RESERVE_MARGIN`) and ``reserve_fraction`` of the budget. Raises ``ValueError`` naming the
    smallest budget that would fit when even ``min_conversations`` does not.
    """
    if budget_minutes <= 0:
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes}.")
    budget = budget_minutes * 60
    reserve = max(reserve_fraction * budget, RESERVE_MARGIN * after_training_seconds)
    # Seconds one more conversation costs: its synthesis and its share of the training steps.
    per_conversation = (
        seconds_per_conversation + num_train_epochs * seconds_per_step / per_device_train_batch_size
    )

    def steps(conversations: int) -> int:
        return max(1, math.ceil(conversations * num_train_epochs / per_device_train_batch_size))

    def total(conversations: int) -> float:
        return (
            setup_seconds
            + conversations * seconds_per_conversation
            + steps(conversations) * seconds_per_step
            + reserve
        )

    fit = int((budget - setup_seconds - reserve) // per_conversation) if per_conversation > 0 else 0
    conversations = (fit // conversations_per_chunk) * conversations_per_chunk
    while conversations > min_conversations and total(conversations) > budget:  # the ceil of the steps
        conversations -= conversations_per_chunk
    if conversations < min_conversations or total(conversations) > budget:
        # setup + work + max(reserve_fraction * B, timed reserve) <= B
        needed = (
            max((total(min_conversations) - reserve) / (1 - reserve_fraction), total(min_conversations)) / 60
        )
        raise ValueError(
            f"--budget_minutes {budget_minutes:g} is too small on this machine ({device}): setup took "
            f"{setup_seconds / 60:.1f} min, a conversation takes {seconds_per_conversation:.2f} s and a training "
            f"step {seconds_per_step:.2f} s, so the {min_conversations} conversations already synthesized need "
            f"about {needed:.1f} min. Give a larger budget, or --num_conversations without a budget."
        )
    return BudgetPlan(
        budget_minutes=budget_minutes,
        device=device,
        dtype=dtype,
        training_dtype=training_dtype,
        setup_seconds=setup_seconds,
        seconds_per_conversation=seconds_per_conversation,
        seconds_per_step=seconds_per_step,
        reserve_seconds=reserve,
        conversations_per_chunk=conversations_per_chunk,
        per_device_train_batch_size=per_device_train_batch_size,
        num_train_epochs=num_train_epochs,
        num_conversations=conversations,
        steps=steps(conversations),
        evaluation_seconds=evaluation_seconds,
        distractor_tokens=distractor_tokens,
    )


def time_training_step(
    model,
    tokenizer,
    rows: list[dict],
    num_virtual_tokens: int,
    batch_size: int,
    repeats: int = 3,
    frozen_tokens: int = 0,
) -> float:
    """Seconds of one cartridge training step (forward and backward of ``batch_size`` rows after a trainable prefix).

    The prefix is a stand-in of the cartridge's size (random keys and values that require grad), after
    ``frozen_tokens`` that do not (the distractors a library's cartridge trains beside); only the cartridge's
    gradient is computed, as in training, where the base model is frozen. Nothing of ``model`` is changed. The
    fastest of ``repeats`` timed steps after one warm-up step: on a shared machine a step is slowed by what else
    runs, never sped up, and one slow probe step once planned a third of the steps the run then had time for.
    """
    from hfx.cartridges.prefix import PrefixKV, forward_with_prefix
    from hfx.cartridges.training import CartridgeCollator
    from hfx.losses import topk_distillation_loss
    from hfx.models import synchronize

    if not rows:
        raise ValueError("No synthesized rows to time a training step on.")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)

    def tensor(tokens: int, trainable: bool):
        t = torch.randn(1, kv_heads, tokens, head_dim, generator=generator)
        return t.to(model.device, model.dtype).requires_grad_(trainable)

    layers = range(config.num_hidden_layers)
    trained = PrefixKV(
        [tensor(num_virtual_tokens, True) for _ in layers], [tensor(num_virtual_tokens, True) for _ in layers]
    )
    prefix = trained
    if frozen_tokens > 0:
        frozen = PrefixKV(
            [tensor(frozen_tokens, False) for _ in layers], [tensor(frozen_tokens, False) for _ in layers]
        )
        prefix = PrefixKV.concat([frozen, trained])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = CartridgeCollator(pad_id)([rows[i % len(rows)] for i in range(batch_size)])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    seconds = []
    for _ in range(repeats + 1):
        synchronize(model.device)
        start = time.perf_counter()
        outputs = forward_with_prefix(
            model,
            prefix,
            batch["input_ids"],
            batch["attention_mask"],
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        loss = topk_distillation_loss(
            outputs.hidden_states[-1],
            model.get_output_embeddings(),
            batch["loss_mask"],
            batch["teacher_topk_ids"],
            batch["teacher_topk_logprobs"],
        )
        torch.autograd.grad(loss, [*trained.keys, *trained.values])
        synchronize(model.device)
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:])


def read_plan(output_dir: str | Path) -> BudgetPlan | None:
    path = Path(output_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return BudgetPlan.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: not a budget plan ({err}); delete it to plan again.") from None


def write_plan(output_dir: str | Path, plan: BudgetPlan) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(output_dir) / PLAN_FILE, json.dumps(plan.to_json(), indent=2))


def measure_and_plan(
    model,
    tokenizer,
    corpus,
    synthesis,
    budget_minutes: float,
    num_virtual_tokens: int,
    per_device_train_batch_size: int,
    num_train_epochs: float,
    started: float,
    training_dtype: str | torch.dtype | None = None,
    model_name_or_path: str | None = None,
    server=None,
    model_name: str = "",
    probe_batches: int | None = None,
    questions: list | None = None,
    load_seconds: float = 0.0,
    distractor_tokens: int = 0,
) -> tuple[BudgetPlan, dict[int, list[dict]]]:
    """Synthesize the first ``probe_batches`` batches, time a training step and, with ``questions``, the evaluation
    (on a few of them), and plan the run.

    ``started`` is the ``time.perf_counter()`` at which the run began (model loading counts against the budget).
    The step is timed in ``training_dtype`` (the frozen base's dtype during training); when it differs from the
    synthesizing ``model``'s, a copy of ``model_name_or_path`` is loaded in it for the timing (on a CPU with
    AVX512-BF16 or AMX, bfloat16 training steps and float32 generation are each the faster choice).
    ``load_seconds`` is how long the run's first model load took: training and evaluation each load the model again.
    ``distractor_tokens``: the distractors beside the cartridge in the average training step (a library's mixing,
    :func:`~hfx.cartridges.training.expected_distractor_tokens`), timed as frozen tokens before it.
    ``probe_batches`` defaults to :data:`PROBE_BATCHES` of the device. On a GPU, the decode steps (a CUDA graph per
    bucket) that the run's first batches need are built before the probe, so the probe times batches as the run will
    make them and the building counts as setup.
    Returns the plan and the probe's rows by batch index, to be written as the synthesis's first shards.
    """
    from hfx.cartridges.synthesis import LocalBatches, batch_generator, resolve_conversations_per_chunk
    from hfx.models import dtype_name, load_causal_lm, resolve_dtype, synchronize

    synthesis = resolve_conversations_per_chunk(synthesis, model, server=server)
    accelerator = model.device.type != "cpu" and server is None
    if probe_batches is None:
        probe_batches = PROBE_BATCHES["accelerator" if accelerator else "cpu"]
    # Rows of a batch depend on (seed, batch index) alone, so the probe's batches are those of the planned run.
    probed = probe_batches * synthesis.conversations_per_chunk
    probe_config = dataclasses.replace(synthesis, num_conversations=probed)
    logger.info(
        "Planning %g min: timing the first %d batches (%d conversations) and a training step",
        budget_minutes,
        probe_batches,
        probed,
    )
    rows: dict[int, list[dict]] = {}
    batch_seconds = []
    with batch_generator(model, tokenizer, server, model_name) as generator:
        if isinstance(generator, LocalBatches) and generator.decoder.cuda_graphs:
            sample = dataclasses.replace(
                synthesis, num_conversations=WARM_UP_BATCHES * synthesis.conversations_per_chunk
            )
            logger.info("Decode steps built for %d buckets", generator.warm_up(corpus, sample))
        for batch_idx in range(probe_batches):
            synchronize(model.device)
            start = time.perf_counter()
            rows[batch_idx] = generator(corpus, probe_config, batch_idx)
            synchronize(model.device)
            batch_seconds.append(time.perf_counter() - start)
    # On an accelerator the first batch is the first to run the re-scoring and sampling kernels (and builds any
    # decode step the warm-up did not): the rate comes from the others, the first batch's extra time is setup.
    warm_batches = 1 if accelerator and probe_batches > 1 else 0
    rate = sum(batch_seconds[warm_batches:]) / (probed - warm_batches * synthesis.conversations_per_chunk)
    probed_seconds = rate * probed
    step_model = model
    if training_dtype is not None and resolve_dtype(training_dtype, model.device) != model.dtype:
        step_model, _ = load_causal_lm(model_name_or_path, device=model.device, dtype=training_dtype)
    overhead = ACCELERATOR_TRAINER_OVERHEAD if model.device.type != "cpu" else TRAINER_OVERHEAD
    seconds_per_step = overhead * time_training_step(
        step_model,
        tokenizer,
        [row for batch in rows.values() for row in batch],
        num_virtual_tokens,
        per_device_train_batch_size,
        frozen_tokens=distractor_tokens,
    )
    training_dtype_name = dtype_name(step_model.dtype)
    del step_model
    evaluation_seconds = 0.0
    if questions:
        from hfx.cartridges.evaluation import default_context_tokens, estimate_evaluation_seconds

        evaluation_seconds = estimate_evaluation_seconds(
            model, tokenizer, corpus.text, questions, max_context_tokens=default_context_tokens(model)
        )
    plan = plan_budget(
        budget_minutes,
        # The probe's conversations are part of the plan's synthesis time, not of its setup.
        setup_seconds=time.perf_counter() - started - probed_seconds,
        seconds_per_conversation=rate,
        seconds_per_step=seconds_per_step,
        conversations_per_chunk=synthesis.conversations_per_chunk,
        per_device_train_batch_size=per_device_train_batch_size,
        num_train_epochs=num_train_epochs,
        min_conversations=probed,
        device=str(model.device),
        dtype=dtype_name(model.dtype),
        training_dtype=training_dtype_name,
        after_training_seconds=evaluation_seconds + 2 * load_seconds,
        evaluation_seconds=evaluation_seconds,
        distractor_tokens=distractor_tokens,
    )
    return plan, rows
