"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), as in FACIL (Masana et al., TPAMI 2022).

The backbone is trained on each task with a quadratic penalty pulling every weight towards its value after the
previous task, weighted by the diagonal Fisher information: ``lamb/2 * sum F (theta - theta_old)^2``. FACIL's
choices: Fisher from the model's own predictions (``max_pred``), fused over tasks as ``alpha F_old + (1-alpha)
F_new``, lamb 5000, alpha 0.5, old heads frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from retain.data.scenarios import Task
from retain.methods.base import Method, MethodConfig, Stage, register_method

__all__ = ["EWCConfig", "EWC", "diagonal_fisher"]


@dataclass
class EWCConfig(MethodConfig):
    name: str = "ewc"
    train_mask: str = "current"  # FACIL: CE over the current task's head only
    lamb: float = 5000.0
    alpha: float = 0.5
    fisher_batch_size: int = 64


def diagonal_fisher(model, loader: DataLoader, device: torch.device, n_seen: int) -> dict[str, torch.Tensor]:
    """Mean over samples of squared gradients of CE w.r.t. the model's predicted class (FACIL ``max_pred``)."""
    params = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n_samples = 0
    model.eval()  # BN statistics must not move while measuring
    for x, _ in loader:
        x = x.to(device)
        logits = model(x)[:, :n_seen]  # (B, C_seen)
        loss = F.cross_entropy(logits, logits.argmax(1))
        model.zero_grad()
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.pow(2) * len(x)
        n_samples += len(x)
    return {n: f / max(n_samples, 1) for n, f in fisher.items()}


@register_method
class EWC(Method):
    config_class = EWCConfig

    def setup(self) -> None:
        self.fisher: dict[str, torch.Tensor] = {}
        self.old_params: dict[str, torch.Tensor] = {}

    def trainable_prefixes(self, task: Task) -> list[str]:
        return ["backbone.", f"head.heads.{task.index}."]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        x, y = batch
        terms = {"ce": F.cross_entropy(self.mask_logits(self.model(x)), y)}
        if self.fisher:
            penalty = sum(
                (self.fisher[n] * (p - self.old_params[n]).pow(2)).sum()
                for n, p in self.model.backbone.named_parameters()
                if n in self.fisher
            )
            terms["ewc"] = self.cfg.lamb / 2 * penalty
        return terms

    def after_task(self, task: Task) -> None:
        for p in self.model.backbone.parameters():
            p.requires_grad_(True)
        loader = self.loader(task.train_eval, self.cfg.fisher_batch_size)
        new = diagonal_fisher(self.model, loader, self.device, task.offset + task.n_classes)
        a = self.cfg.alpha
        self.fisher = {n: a * self.fisher[n] + (1 - a) * f if n in self.fisher else f for n, f in new.items()}
        self.old_params = {n: p.detach().clone() for n, p in self.model.backbone.named_parameters()}
        self.model.zero_grad(set_to_none=True)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.model.state_dict())
        state |= {f"ewc.fisher.{n}": f for n, f in self.fisher.items()}
        return state | {f"ewc.old.{n}": p for n, p in self.old_params.items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k.removeprefix("ewc.fisher."): v for k, v in state.items() if k.startswith("ewc.fisher.")}
        self.old_params = {k.removeprefix("ewc.old."): v for k, v in state.items() if k.startswith("ewc.old.")}
        super().load_checkpoint_state({k: v for k, v in state.items() if not k.startswith("ewc.")})
