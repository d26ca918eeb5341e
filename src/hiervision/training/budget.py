"""How long a run takes, said before it is long, and a time budget it fits (``train --time 20m``).

The first steps of a run measure its speed; from them :class:`Planner` estimates the whole run (training and
validation of every epoch) and says so once ("about 1 h 25 min for 30 epochs"). With ``train.time_budget`` it
plans the number of epochs that fit, at most ``train.epochs``, and the learning-rate schedule follows: the
schedule is a pure function of the step and ``train.epochs``, so changing the plan changes the rest of the run,
never the work already done. A resumed run plans its remaining epochs in its new budget, counted from when the
command started.
"""

from __future__ import annotations

import time

__all__ = ["ESTIMATE_STEPS", "VALIDATION_COST", "Planner", "format_duration"]

#: optimizer steps timed before the estimate (the first one, with its warm-up costs, is not counted)
ESTIMATE_STEPS = 20
#: a validation image costs about this share of a training image (a forward pass, no backward)
VALIDATION_COST = 0.4


def format_duration(seconds: float) -> str:
    """``5025`` → ``"1 h 24 min"``, ``170`` → ``"2 min 50 s"``, ``42`` → ``"42 s"``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class Planner:
    """Times the first :data:`ESTIMATE_STEPS` steps of this call, then estimates an epoch and the run, plans the
    epochs a budget allows (``tcfg["epochs"]`` is changed in place: the schedule and the loop read it) and gives
    the bar its whole-run time left."""

    def __init__(self, tcfg: dict, train_images: int, val_images: int, first_epoch: int) -> None:
        self.tcfg, self.first_epoch = tcfg, first_epoch
        self.configured = int(tcfg["epochs"])
        self.budget = tcfg.get("time_budget")
        self.start = time.monotonic()
        self.epoch_images = train_images + VALIDATION_COST * val_images
        self.steps, self.images, self.t0 = 0, 0, None
        self.per_image: float | None = None  # seconds per training image, once measured
        self.measured: float | None = None  # the first whole epoch's seconds, once it ends

    def after_step(self, images: int) -> str | None:
        """Count one optimizer step of ``images``; the sentence to print once the estimate is made, else None."""
        self.steps += 1
        if self.steps == 1:
            self.t0 = time.monotonic()  # the first step's warm-up is not timed
            return None
        self.images += images
        if self.per_image is not None or self.measured is not None or self.steps <= ESTIMATE_STEPS:
            return None
        self.per_image = (time.monotonic() - self.t0) / max(self.images, 1)
        return self._plan()

    def after_epoch(self, seconds: float) -> str | None:
        """The first whole epoch of this call took ``seconds`` (training and validation): a better estimate than
        the first steps'. The sentence to print when it changes the plan (or makes the first one), else None."""
        if self.measured is not None:
            return None
        before, self.measured = self.epoch_seconds(), seconds
        if before is not None and abs(seconds - before) <= 0.25 * before:
            return None
        return self._plan()

    def epoch_seconds(self) -> float | None:
        if self.measured is not None:
            return self.measured
        return None if self.per_image is None else self.per_image * self.epoch_images

    def left(self, epoch: int, done_in_epoch: float) -> str | None:
        """The whole run's time left (for the bar), from epoch ``epoch`` with ``done_in_epoch`` of it done."""
        each = self.epoch_seconds()
        if each is None:
            return None
        return format_duration(max(0.0, (int(self.tcfg["epochs"]) - epoch - done_in_epoch) * each))

    def _plan(self) -> str:
        each = self.epoch_seconds()
        remaining = self.configured - self.first_epoch
        on = "the first epoch" if self.measured is not None else f"the first {ESTIMATE_STEPS} steps"
        if self.budget is None:
            return (f"time: about {format_duration(remaining * each)} for {remaining} epoch(s), "
                    f"{format_duration(each)} each (timed on {on}); --time 20m (train.time_budget) fits a budget")
        spent = (time.monotonic() - self.start) if self.measured is None else self.measured  # this call's so far
        fit = max(1, min(remaining, int((float(self.budget) - spent) // each) + (self.measured is not None)))
        self.tcfg["epochs"] = self.first_epoch + fit
        return (f"time budget {format_duration(float(self.budget))}: {fit} of {remaining} epoch(s) fit, "
                f"{format_duration(each)} each; the learning-rate schedule spans {self.tcfg['epochs']} epochs")
