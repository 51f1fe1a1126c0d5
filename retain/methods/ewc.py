"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), as in FACIL (Masana et al., TPAMI 2022).

The backbone is trained on each task with a quadratic penalty pulling every weight towards its value after the
previous task, weighted by the diagonal Fisher information: ``lamb/2 * sum F (theta - theta_old)^2``. FACIL's
choices: Fisher from the model's own predictions (``max_pred`` over the seen heads), fused over tasks as
``F <- alpha F + (1-alpha) F_task`` starting from ``F = 0`` (so task 0's Fisher enters at weight ``1-alpha``), lamb
5000, alpha 0.5, old heads frozen. ``fisher`` picks how ``F_task`` is measured: ``eval`` (default) or FACIL's exact
train-mode pass (``facil``); see docs/baselines.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from retain import distributed
from retain.config import ConfigError
from retain.data.scenarios import Task
from retain.methods.base import ContinualModel, Method, MethodConfig, Stage, register_method, tensor_bytes
from retain.models.continual import head_prefix

__all__ = ["EWCConfig", "EWC", "FISHER_MODES", "diagonal_fisher"]

FISHER_MODES = ("eval", "facil")


@dataclass
class EWCConfig(MethodConfig):
    name: str = "ewc"
    train_mask: str = "current"  # FACIL: CE over the current task's head only
    lamb: float = 5000.0  # penalty weight: lamb/2 * sum F (theta - theta_old)^2
    alpha: float = 0.5  # fusion F <- alpha F + (1 - alpha) F_task, from F = 0 (FACIL)
    # eval: eval mode, un-augmented train images (task.train_eval), every sample, batch fisher_batch_size;
    # facil: FACIL's pass: train mode, augmented train set shuffled (seeded), batch train.batch_size, the last
    # partial batch skipped (len // batch batches); BN running statistics move during it, as in FACIL
    fisher: str = "eval"
    fisher_batch_size: int = 64  # batch of the eval-mode pass (facil uses train.batch_size, as FACIL)


def diagonal_fisher(model: ContinualModel, loader: Iterable, device: torch.device, n_seen: int,
                    train: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """Mean over samples of squared gradients of CE w.r.t. the model's predicted class over the first ``n_seen``
    logits (FACIL ``max_pred``: each batch's squared gradient of the batch-mean CE, weighted by the batch size).

    ``train``: measure in train mode (FACIL; BN uses batch statistics and updates its running ones), else eval.
    The model's mode is restored afterwards. Under several processes ``loader`` is this process's shard of whole
    batches: the sums and the sample count are added over processes (the Fisher is then the same on every one).
    """
    params = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n_samples = 0
    was_training = model.training
    model.train(train)
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
    model.train(was_training)
    if distributed.active():
        n_samples = int(distributed.all_reduce_sum(torch.tensor([n_samples])).item())
        fisher = {n: distributed.all_reduce_sum(f) for n, f in fisher.items()}
    return {n: f / max(n_samples, 1) for n, f in fisher.items()}


@register_method
class EWC(Method):
    config_class = EWCConfig

    def __init__(self, cfg: EWCConfig, *args: Any, **kwargs: Any) -> None:
        if cfg.fisher not in FISHER_MODES:
            raise ConfigError(f"method.fisher={cfg.fisher!r}; valid: {', '.join(FISHER_MODES)}")
        super().__init__(cfg, *args, **kwargs)

    def setup(self) -> None:
        self.fisher: dict[str, torch.Tensor] = {}
        self.old_params: dict[str, torch.Tensor] = {}

    def trainable_prefixes(self, task: Task) -> list[str]:
        return ["backbone.", head_prefix(task.index)]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        x, y = batch
        terms = {"ce": F.cross_entropy(self.mask_logits(self.model(x), y), y)}
        if self.fisher:
            penalty = sum(
                (self.fisher[n] * (p - self.old_params[n]).pow(2)).sum()
                for n, p in self.model.backbone.named_parameters()
                if n in self.fisher
            )
            terms["ewc"] = self.cfg.lamb / 2 * penalty
        return terms

    def fisher_batches(self, task: Task) -> Iterable:
        """The batches the Fisher of ``task`` is measured on (``cfg.fisher``).

        ``facil``: FACIL's training loader, shuffled, cut to its ``len // batch_size`` full batches; the order is
        a permutation from a ``torch.Generator`` seeded by one draw of the global RNG (which the engine seeds per
        task), so a run is deterministic; each image is augmented under its own seed as in training
        (``retain.engine.loading``).
        """
        if self.cfg.fisher == "eval":
            return self.loader(task.train_eval, self.cfg.fisher_batch_size)
        data, batch_size = task.train, self.train_cfg.batch_size
        n_batches = len(data) // batch_size
        if n_batches == 0:
            raise ConfigError(f"method.fisher=facil: task {task.index} has {len(data)} training samples, fewer than "
                              f"train.batch_size={batch_size} (FACIL drops the partial batch); lower the batch size "
                              "or use method.fisher=eval")  # fmt: skip
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        order = torch.randperm(len(data), generator=generator)[: n_batches * batch_size].tolist()
        return self.loader(Subset(data, order), batch_size)

    def estimate_fisher(self, task: Task) -> dict[str, torch.Tensor]:
        """This task's diagonal Fisher of every backbone weight (before fusion)."""
        for p in self.model.backbone.parameters():
            p.requires_grad_(True)
        fisher = diagonal_fisher(self.model, self.fisher_batches(task), self.device, task.offset + task.n_classes,
                                 train=self.cfg.fisher == "facil")  # fmt: skip
        self.model.zero_grad(set_to_none=True)
        return fisher

    def after_task(self, task: Task) -> None:
        new = self.estimate_fisher(task)
        a = self.cfg.alpha  # FACIL fuses from zeros: task 0's Fisher enters at weight 1 - alpha
        self.fisher = {n: a * self.fisher.get(n, torch.zeros_like(f)) + (1 - a) * f for n, f in new.items()}
        self.old_params = {n: p.detach().clone() for n, p in self.model.backbone.named_parameters()}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.model.state_dict())
        state |= {f"ewc.fisher.{n}": f for n, f in self.fisher.items()}
        return state | {f"ewc.old.{n}": p for n, p in self.old_params.items()}

    def checkpoint_bytes(self, task: Task) -> int:
        """The model, and the Fisher and old value of every backbone weight (held from the first ``after_task``)."""
        return tensor_bytes(self.model.state_dict().values()) + 2 * tensor_bytes(self.model.backbone.parameters())

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k.removeprefix("ewc.fisher."): v for k, v in state.items() if k.startswith("ewc.fisher.")}
        self.old_params = {k.removeprefix("ewc.old."): v for k, v in state.items() if k.startswith("ewc.old.")}
        super().load_checkpoint_state({k: v for k, v in state.items() if not k.startswith("ewc.")})
