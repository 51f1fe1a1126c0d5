"""Learning without Forgetting (Li & Hoiem, ECCV 2016), as in FACIL (Masana et al., TPAMI 2022).

The whole model is trained on the new task while the outputs of the previous tasks' heads are distilled from a
frozen copy of the model taken after the previous task:
``loss = CE(current head) + lamb * KD_T(heads_<t(new), heads_<t(old))``, KD with temperature T and FACIL's
``1e-5 / C`` smoothing of the student. The PAD methods (Pelosin, Jha et al. 2022) add their terms on top of this.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retain.data.scenarios import Task
from retain.losses import lwf_kd
from retain.methods.base import Method, MethodConfig, Stage, register_method
from retain.models.continual import head_prefix

__all__ = ["LwFConfig", "LwF", "distillation_loss"]


@dataclass
class LwFConfig(MethodConfig):
    name: str = "lwf"
    train_mask: str = "current"  # FACIL: CE over the current task's head only
    lamb: float = 1.0
    temperature: float = 2.0


def distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """FACIL's cross-entropy KD; the same as ``retain.losses.lwf_kd``, where it lives."""
    return lwf_kd(new_logits, old_logits, temperature)


@register_method
class LwF(Method):
    config_class = LwFConfig

    def setup(self) -> None:
        self.old_model = None

    def trainable_prefixes(self, task: Task) -> list[str]:
        return ["backbone.", head_prefix(task.index)]  # FACIL: old heads stay frozen without exemplars

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.model(x)  # (B, C)
        terms = {"ce": F.cross_entropy(self.mask_logits(logits, y), y)}
        if self.old_model is not None and self.task.offset > 0:
            with torch.no_grad():
                old = self.old_model(x)[:, : self.task.offset]  # (B, C_old)
            kd = lwf_kd(logits[:, : self.task.offset], old, self.cfg.temperature)
            terms["kd"] = self.cfg.lamb * kd
        return terms

    def after_task(self, task: Task) -> None:
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self.after_task(last_task)
