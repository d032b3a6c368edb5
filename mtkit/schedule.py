"""What each optimizer update of a run gets, as pure functions of its number: the learning rate,
where a decaying schedule ends, and the seed of each batch's dropout masks. Pure, so that the
schedule needs no state of its own and a resumed run, or one split over several processes, gets
the very same values."""

import math

import numpy as np


def lr_at(step: int, *, lr: float, schedule: str, warmup: int, d_model: int, max_steps: int) -> float:
    """The learning rate of optimizer update number `step` (1, 2, ...): a pure function, so the
    schedule needs no state of its own and a resumed run gets the same values.

    inverse_sqrt: linear warm-up to `lr`, then lr * sqrt(warmup / step).
    noam (the paper): lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5); here `lr` is the
        paper's scale factor (around 1-2), not the peak.
    cosine: linear warm-up to `lr`, then half a cosine down to 0 at max_steps (schedule_end).
    """
    if step <= 0:
        return 0.0
    if schedule == "noam":
        return lr * d_model ** -0.5 * min(step ** -0.5, step * max(warmup, 1) ** -1.5)
    if step < warmup:
        return lr * step / warmup
    if schedule == "inverse_sqrt":
        return lr * math.sqrt(max(warmup, 1) / step)
    if schedule == "cosine":
        done = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return lr * 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown schedule {schedule!r}")


def schedule_end(steps_done: int, seconds: float, *, max_steps: int, max_time: float | None) -> int:
    """Where a decaying schedule (cosine) reaches 0: max_steps, or the step at which max_time is
    expected to stop the run, at the speed so far, so that it anneals to its last minute on a fast
    CPU and a slow one alike (its rates then follow the clock: not reproduced exactly)."""
    if not max_time or steps_done <= 0 or seconds <= 0:
        return max_steps
    return min(max_steps, round(steps_done * max_time / seconds))


def batch_seed(seed: int, step: int, batch: int) -> int:
    """The seed of the dropout masks of batch number `batch` of update `step` of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, step, batch]).generate_state(1, np.uint64)[0])
