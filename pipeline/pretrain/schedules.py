"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

They are small module-level classes rather than closures so that a scheduler holding them pickles
and its ``state_dict`` round-trips through a checkpoint.
"""
from __future__ import annotations

import math

from pipeline.common import ConfigError


class WarmupCosine:
    """Linear warmup from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``.

    ``__call__(step) -> float`` multiplier of the base learning rate; constant after ``total_steps``.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1) so the very first update already moves the weights
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupCosineRestarts:
    """Linear warmup, then SGDR cosine cycles (the original M-FLAG code's ``CosineAnnealingWarmRestarts``).

    The first cycle after warmup lasts ``cycle_steps``; each next one ``t_mult`` times longer. Within a
    cycle the multiplier falls from 1 to ``min_ratio``; at each restart it jumps back to 1.
    """

    def __init__(self, warmup_steps: int, cycle_steps: int, t_mult: int = 1, min_ratio: float = 0.0):
        if cycle_steps < 1:
            raise ValueError(f"cycle_steps must be >= 1, got {cycle_steps}")
        if t_mult < 1:
            raise ValueError(f"t_mult must be >= 1, got {t_mult}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.cycle_steps = int(cycle_steps)
        self.t_mult = int(t_mult)
        self.min_ratio = float(min_ratio)

    def position(self, step: int) -> tuple[int, int, int]:
        """(cycle index, step within the cycle, cycle length) for a post-warmup ``step``."""
        t = step - self.warmup_steps
        length, cycle = self.cycle_steps, 0
        while t >= length:
            t -= length
            length *= self.t_mult
            cycle += 1
        return cycle, t, length

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        _, t, length = self.position(step)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t / length))


# The original code divides by 4 whatever the number of processes (M-FLAG utils/utils_trainer.py
# lines 102-103), while its README launches 2 (torchrun --nproc_per_node=2): on 2 processes its cycle
# is about a fifth of the run, not the 40% the formula's 0.4 suggests.
ORIGINAL_T0_DIVISOR = 4


def original_restart_period(max_epochs: int, num_samples: int, batch_per_process: int) -> int:
    """The original code's ``CosineAnnealingWarmRestarts`` T_0, in optimizer steps.

    ``int(max_epochs * num_samples // 4 // batch_per_process * 0.4)``, evaluated left to right as in
    M-FLAG ``utils/utils_trainer.py`` lines 100-106 (``num_samples`` is its ``len(train_dataset)``,
    ``batch_per_process`` its ``batch_size``). The result may be 0 for small data; torch refuses such
    a T_0, and so do the callers here.
    """
    if max_epochs < 0 or num_samples < 0 or batch_per_process < 1:
        raise ValueError(f"need max_epochs >= 0, num_samples >= 0, batch_per_process >= 1; got "
                         f"{max_epochs}, {num_samples}, {batch_per_process}")
    return int(max_epochs * num_samples // ORIGINAL_T0_DIVISOR // batch_per_process * 0.4)


def restart_cycle(restart_every: int | None, restart_period: str, restart_fraction: float, *, epochs: int,
                  num_samples: int, batch_per_process: int, total_steps: int) -> int:
    """Steps per cosine cycle: ``restart_every``, the original's T_0 (``restart_period`` "original"),
    or ``restart_fraction`` of the run. Raises ConfigError when the original's T_0 is below 1."""

    if restart_every:
        return restart_every
    if restart_period == "original":
        # The original's max_epochs is epochs - 1: its loop range(start, max_epochs + 1) trains one
        # epoch more than the formula counts (utils_trainer.py lines 102 and 112).
        t0 = original_restart_period(epochs - 1, num_samples, batch_per_process)
        if t0 < 1:
            raise ConfigError(
                f"restart_period: the original's T_0 = int({epochs - 1} x {num_samples} // 4 // "
                f"{batch_per_process} x 0.4) is {t0} steps (max_epochs = epochs - 1, samples per epoch, batch "
                "per process); torch's CosineAnnealingWarmRestarts needs T_0 >= 1: use more epochs or "
                "data, restart_every, or restart_period fraction")
        return t0
    return max(1, round(restart_fraction * total_steps))


def lr_multiplier(schedule: str, *, warmup_steps: int, total_steps: int, lr: float, min_lr: float | None,
                  min_lr_ratio: float, cycle: int | None) -> WarmupCosine | WarmupCosineRestarts:
    """The LambdaLR multiplier of ``schedule`` (cosine | restarts, with ``cycle`` steps per cycle |
    constant), warmup capped at the run's length. An absolute floor ``min_lr`` (the original's eta_min)
    becomes a multiplier of ``lr``: LambdaLR then gives eta_min + (lr - eta_min) x cosine, the formula of
    torch's CosineAnnealingWarmRestarts; otherwise the floor is ``min_lr_ratio``."""
    warm = min(warmup_steps, total_steps)
    floor = min_lr / lr if min_lr is not None else min_lr_ratio
    if schedule == "cosine":
        return WarmupCosine(warm, total_steps, floor)
    if schedule == "restarts":
        return WarmupCosineRestarts(warm, cycle, 1, floor)
    return WarmupCosine(warm, total_steps, 1.0)
