"""Learning-rate schedules: one :class:`Schedule` per training stage, stepped by the engine.

``train.schedule``:

- ``constant`` / ``cosine``: a per-step multiplier on the optimiser's lr, a linear warm-up over ``train.warmup_steps``
  (or ``round(train.warmup_epochs * steps_per_epoch)``) steps, then constant or a cosine down to ``train.min_lr``
  at ``total_steps``. Built on ``torch.optim.lr_scheduler.LambdaLR``, so the lrs are bit-identical to the engine's
  former ``build_scheduler``.
- ``plateau``: FACIL's patience scheme (Masana et al., TPAMI 2022, ``incremental_learning.py`` ``train_loop``).
  The lr is constant between decisions taken at the end of every epoch from the validation loss: a lower loss
  than the best so far keeps a copy of the model's weights and resets the patience counter to ``train.patience``;
  otherwise the counter drops by one and at zero the lr is divided by ``train.lr_factor``. If the new lr is below
  ``train.stop_lr`` the stage stops (the lr is left as it was, as in FACIL); else the counter is reset, the new lr
  set and, with ``train.restore_best``, the best weights reloaded. :meth:`Schedule.finish` reloads them at the end
  of the stage (FACIL always does both). Needs a validation split (``scenario.val_fraction``, FACIL: 0.1).

  Choices: the warm-up applies under ``plateau`` too, as the same per-step multiplier on the current lr during
  the first warm-up steps (FACIL has none in its loop; the default is no warm-up). Each param group keeps its own
  lr and all are divided by ``lr_factor`` together (the optimiser here has one group, as in FACIL, which sets
  ``param_groups[0]``); the stop test uses group 0. The best weights are what the stage can change, cloned on the
  model's device: its ``state_dict()`` less the parameters the optimiser does not step (buffers such as BatchNorm
  statistics included), so restoring them gives FACIL's full-model ``get_copy`` bit for bit while the copy (and a
  mid-task checkpoint holding it) is only the stage's trained tensors; if no epoch ever improved (NaN losses),
  nothing is restored.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from retain.config import ConfigError, TrainConfig

__all__ = ["SCHEDULES", "Schedule", "build_schedule"]

SCHEDULES = ("constant", "cosine", "plateau")

NEEDS_VALIDATION = "train.schedule=plateau needs a validation split: set scenario.val_fraction > 0 (FACIL uses 0.1)"


class Schedule:
    """The learning rate of one training stage (see the module docstring for the schedules).

    Call :meth:`step` after every optimiser step, :meth:`end_epoch` after every epoch (it returns True when the
    stage should stop now) and :meth:`finish` at the end of the stage.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int,
                 total_steps: int) -> None:  # fmt: skip
        if train.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={train.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if train.schedule == "plateau":
            if train.patience < 1:
                raise ConfigError(f"train.patience={train.patience}; plateau needs at least 1 epoch (FACIL: 5)")
            if not train.lr_factor > 1.0:
                raise ConfigError(
                    f"train.lr_factor={train.lr_factor}; plateau divides the lr by it, use > 1 (FACIL: 3)"
                )
        self.optimizer = optimizer
        self.train = train
        self.kind = train.schedule
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.warmup = train.warmup_steps or round(train.warmup_epochs * steps_per_epoch)
        base = optimizer.param_groups[0]["lr"]
        self.floor = train.min_lr / base if base > 0 else 0.0  # cosine: final multiplier
        # plateau state (FACIL's best_loss, best_model, patience)
        self.best_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.counter = train.patience
        self.stopped = False
        self.epoch = 0
        self._sched = torch.optim.lr_scheduler.LambdaLR(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        """Multiplier of the base lr after ``step`` optimiser steps (the old ``build_scheduler``'s arithmetic)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind != "cosine":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    @property
    def lr(self) -> float:
        """Current lr of param group 0."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def steps(self) -> int:
        """Optimiser steps taken so far in this stage."""
        return self._sched.last_epoch

    @property
    def base_lrs(self) -> list[float]:
        """The lr of each param group before the warm-up/cosine multiplier (divided at each plateau decay)."""
        return list(self._sched.base_lrs)

    def _set_base_lrs(self, base_lrs: list[float]) -> None:
        self._sched.base_lrs = list(base_lrs)
        lrs = [b * self._factor(self._sched.last_epoch) for b in base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._sched._last_lr = lrs

    def step(self) -> None:
        """After every optimiser step."""
        self._sched.step()

    def end_epoch(self, model: nn.Module, val_loss: float | None) -> bool:
        """After every epoch; True means stop the stage now (plateau: the lr fell below ``train.stop_lr``)."""
        self.epoch += 1
        if self.kind != "plateau":
            return False
        if val_loss is None:
            raise ConfigError(NEEDS_VALIDATION)
        if self.stopped:
            return True
        if val_loss < self.best_loss:  # NaN never improves, as in FACIL
            self.best_loss = float(val_loss)
            self.best_state = self.snapshot(model)
            self.counter = self.train.patience
            return False
        self.counter -= 1
        if self.counter > 0:
            return False
        decayed = [b / self.train.lr_factor for b in self._sched.base_lrs]
        if decayed[0] < self.train.stop_lr:
            self.stopped = True
            return True
        self.counter = self.train.patience
        self._set_base_lrs(decayed)
        if self.train.restore_best and self.best_state is not None:
            self._restore(model)
        return False

    def finish(self, model: nn.Module) -> None:
        """End of the stage; plateau with ``train.restore_best``: reload the lowest-validation-loss weights."""
        if self.kind == "plateau" and self.train.restore_best and self.best_state is not None:
            self._restore(model)

    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Clones of what this stage can change: ``model.state_dict()`` less the parameters the optimiser does not
        step (those stay as they were for the whole stage)."""
        stepped = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in stepped}
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}

    def _restore(self, model: nn.Module) -> None:
        unknown = model.load_state_dict(self.best_state, strict=False).unexpected_keys
        if unknown:
            raise ValueError(f"the best weights hold {unknown[0]}, which the model does not have")

    def state_dict(self) -> dict[str, Any]:
        """All that is needed to continue exactly; JSON-friendly except ``best_state`` (tensors or None)."""
        return {
            "schedule": self.kind,
            "steps": self._sched.last_epoch,
            "epoch": self.epoch,
            "base_lrs": [float(b) for b in self._sched.base_lrs],
            "floor": self.floor,
            "warmup": self.warmup,
            "total_steps": self.total_steps,
            "best_loss": None if math.isinf(self.best_loss) else self.best_loss,
            "counter": self.counter,
            "stopped": self.stopped,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; also sets the optimiser's lrs to the saved position."""
        if state["schedule"] != self.kind:
            raise ValueError(f"schedule state is for {state['schedule']!r}, this stage uses {self.kind!r}")
        self.warmup, self.total_steps, self.floor = state["warmup"], state["total_steps"], state["floor"]
        self.epoch = state["epoch"]
        self.best_loss = math.inf if state["best_loss"] is None else float(state["best_loss"])
        self.counter, self.stopped = state["counter"], state["stopped"]
        best = state["best_state"]
        self.best_state = None if best is None else {k: v.detach().clone() for k, v in best.items()}
        self._sched.last_epoch = state["steps"]
        self._sched._step_count = state["steps"] + 1  # not a fresh scheduler: no "step order" warning
        self._set_base_lrs(state["base_lrs"])


def build_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int,
                   total_steps: int) -> Schedule:  # fmt: skip
    """The :class:`Schedule` ``train.schedule`` names (constant | cosine | plateau)."""
    return Schedule(optimizer, train, steps_per_epoch, total_steps)
