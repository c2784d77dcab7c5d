"""Temperature / alpha schedules produce the configured values."""

import math

import pytest

from hfx.lens.schedules import Schedule


def test_schedules_hit_their_configured_values():
    linear = Schedule("linear", start=0.0, end=1.0, steps=100, warmup_steps=10)
    assert [linear(s) for s in (0, 10, 60, 110, 500)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    cosine = Schedule("cosine", start=2.0, end=0.5, steps=10)
    assert cosine(0) == 2.0 and cosine(10) == 0.5 and math.isclose(cosine(5), 1.25)
    exponential = Schedule("exponential", start=1.0, end=0.01, steps=4)
    assert [round(exponential(s), 6) for s in (0, 2, 4, 8)] == [1.0, 0.1, 0.01, 0.01]
    assert Schedule("constant", start=0.3)(1234) == 0.3


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="kind must be one of"):
        Schedule("step")
    with pytest.raises(ValueError, match="exponential schedule needs start and end > 0"):
        Schedule("exponential", start=0.0, end=1.0)
    with pytest.raises(ValueError, match="steps >= 1"):
        Schedule("linear", steps=0)


@pytest.mark.parametrize(
    "kind, kwargs, expected",
    [
        # learning rate at steps 0, 2 (end of warmup), 6, 10 (end), for lr 1.0, 2 warmup steps, 10 steps
        ("constant_with_warmup", {}, [0.0, 1.0, 1.0, 1.0]),
        ("linear", {}, [0.0, 1.0, 0.5, 0.0]),
        ("cosine", {}, [0.0, 1.0, 0.5, 0.0]),
        ("cosine_with_restarts", {"num_cycles": 2}, [0.0, 1.0, 1.0, 0.0]),
        ("polynomial", {"power": 2.0, "lr_end": 0.0}, [0.0, 1.0, 0.25, 0.0]),
        ("exponential", {"final_lr_ratio": 0.01}, [0.0, 1.0, 0.1, 0.01]),
    ],
)
def test_lr_schedules_produce_the_configured_values(tmp_path, kind, kwargs, expected):
    import torch

    from hfx.lens.training import LensTrainer, LensTrainingArguments

    args = LensTrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=1.0,
        lr_scheduler_type=kind,
        lr_scheduler_kwargs=kwargs,
        warmup_steps=2,
        max_steps=10,
    )
    assert args.to_dict()["lr_scheduler_type"] == kind
    trainer = LensTrainer.__new__(LensTrainer)  # the scheduler needs only args and an optimizer
    trainer.args, trainer.lr_scheduler = args, None
    trainer.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = trainer.create_scheduler(10)
    rates = []
    for _ in range(11):
        rates.append(scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        scheduler.step()
    got = [round(rates[s], 6) for s in (0, 2, 6, 10)]
    assert got == pytest.approx(expected, abs=1e-6), (kind, rates)


def test_exponential_lr_ratio_is_checked(tmp_path):
    from hfx.lens.training import LensTrainingArguments

    with pytest.raises(ValueError, match="final_lr_ratio must be in"):
        LensTrainingArguments(
            output_dir=str(tmp_path),
            lr_scheduler_type="exponential",
            lr_scheduler_kwargs={"final_lr_ratio": 0},
        )
