"""Per-task LayerNorm for LN tuning (De Min et al., "On the Effectiveness of LayerNorm Tuning for Continual Learning
in Vision Transformers", ICCVW 2023).

``inject_task_layernorm(vit, n_tasks)`` replaces every ``nn.LayerNorm`` of a timm ViT, by name, with a
``TaskLayerNorm`` that holds a (tasks x dim) table of scale and bias rows (``ln_weight``, ``ln_bias``), initialised
from the pre-trained values, which stay as frozen buffers (the "pre-trained row"). Which row a forward pass uses is
set on all layers at once by the one per-task switch, ``retain.models.adapters.set_task(model, task)`` /
``use_task(model, task)`` (``TaskLayerNorm.set_task``); a freshly injected layer uses the pre-trained row:

- an ``int`` t: row t for every sample (one fused ``F.layer_norm``, the training path);
- ``PRETRAINED`` (-1): the pre-trained values, so the same backbone *is* the frozen pre-trained ViT;
- a (B,) tensor of task ids: each sample gathers its own rows, so a batch that mixes tasks needs one pass;
- ``SelectTask(upto)``: each layer picks its own row per sample from its CLS input (single-stage variant).

Selection and the similarity term are computed in float32 whatever the autocast (ties must route alike in training
and at test).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRETRAINED", "SelectTask", "TaskLayerNorm", "inject_task_layernorm", "task_layernorms", "copy_task_rows"]

PRETRAINED = -1  # task index selecting the frozen pre-trained scale and bias


@dataclass(frozen=True)
class SelectTask:
    """Single-stage selection: each layer picks, per sample, the task k <= ``upto`` whose key matches best."""

    upto: int


TaskSpec = int | torch.Tensor | SelectTask


class TaskLayerNorm(nn.Module):
    """A LayerNorm with one (scale, bias) row per task, initialised from (and keeping) a pre-trained LayerNorm.

    Args:
        base_layer: the LayerNorm replaced; its eps, shape and affine values are kept (values as frozen buffers).
        n_tasks: rows in the table.
        selector: also hold a per-task key and attention vector (``ln_key``, ``ln_att``, orthogonal init) for the
            single-stage variant, where each layer selects its task from the CLS token entering it.
    """

    def __init__(self, base_layer: nn.LayerNorm, n_tasks: int, selector: bool = False) -> None:
        super().__init__()
        if len(base_layer.normalized_shape) != 1:
            raise ValueError(f"TaskLayerNorm supports a 1-d normalized_shape, got {base_layer.normalized_shape}")
        (dim,) = base_layer.normalized_shape
        self.normalized_shape, self.eps = base_layer.normalized_shape, base_layer.eps
        ref = next(iter(base_layer.parameters()), torch.empty(0))
        w = base_layer.weight.detach() if base_layer.weight is not None else torch.ones(dim, device=ref.device)
        b = base_layer.bias.detach() if base_layer.bias is not None else torch.zeros(dim, device=ref.device)
        self.register_buffer("pretrained_weight", w.clone())  # (D,)
        self.register_buffer("pretrained_bias", b.clone())  # (D,)
        self.register_buffer("_ones", torch.ones_like(w), persistent=False)  # (D,)
        self.register_buffer("_zeros", torch.zeros_like(w), persistent=False)  # (D,)
        self.ln_weight = nn.Parameter(w.repeat(n_tasks, 1))  # (T, D), a real copy (not a stride-0 expand)
        self.ln_bias = nn.Parameter(b.repeat(n_tasks, 1))  # (T, D)
        if selector:
            self.ln_key = nn.Parameter(nn.init.orthogonal_(torch.empty(n_tasks, dim, device=w.device)))  # (T, D)
            self.ln_att = nn.Parameter(nn.init.orthogonal_(torch.empty(n_tasks, dim, device=w.device)))  # (T, D)
        self.task: TaskSpec = PRETRAINED  # a plain forward is the pre-trained layer; task rows are set explicitly
        self.similarity: torch.Tensor | None = None  # (B,) cos(att_t * cls, key_t) of the last oracle pass
        self.selected: torch.Tensor | None = None  # (B,) ids chosen by the last SelectTask pass

    @property
    def n_tasks(self) -> int:
        return self.ln_weight.shape[0]

    @property
    def has_selector(self) -> bool:
        return hasattr(self, "ln_key")

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, tasks={self.n_tasks}, eps={self.eps}, selector={self.has_selector}"

    def set_task(self, task: TaskSpec) -> None:
        """Rows to use from now on (the per-task switch, ``retain.models.adapters.set_task`` / ``use_task``)."""
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self.task
        if isinstance(task, SelectTask):
            task = self.selected = self._select(x, task.upto)  # (B,)
        if isinstance(task, torch.Tensor):
            return self._gathered(x, task)
        if task == PRETRAINED:
            return F.layer_norm(x, self.normalized_shape, self.pretrained_weight, self.pretrained_bias, self.eps)
        if self.has_selector:
            self.similarity = self._similarity(x[:, 0], torch.full_like(x[:, 0, 0], task, dtype=torch.long))
        return F.layer_norm(x, self.normalized_shape, self.ln_weight[task], self.ln_bias[task], self.eps)

    def _gathered(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-sample rows: normalise (identity affine), then one scale-and-shift with the gathered rows.

        An identity weight keeps CPU's fast affine LayerNorm kernel (``weight=None`` is slower there); without
        autograd the scale-and-shift writes in place.
        """
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        w = self.ln_weight[ids].view(shape)  # (B, 1, D)
        b = self.ln_bias[ids].view(shape)  # (B, 1, D)
        xn = F.layer_norm(x, self.normalized_shape, self._ones, self._zeros, self.eps)  # (B, N, D)
        if torch.is_grad_enabled() and (xn.requires_grad or w.requires_grad):
            return torch.addcmul(b, xn, w)  # (B, N, D)
        return torch.addcmul(b, xn, w, out=xn)  # (B, N, D)

    def _similarity(self, cls: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B,) cos(att_id * cls, key_id) for each sample's task id, in float32."""
        with torch.autocast(cls.device.type, enabled=False):
            q = cls.float() * self.ln_att[ids].float()  # (B, D)
            return F.cosine_similarity(q, self.ln_key[ids].float(), dim=-1)  # (B,)

    def _select(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """(B,) argmax over tasks k <= upto of cos(att_k * cls, key_k) in float32, cls = the token entering here."""
        if not self.has_selector:
            raise RuntimeError("SelectTask needs TaskLayerNorm(selector=True) (the single-stage variant)")
        with torch.autocast(x.device.type, enabled=False):
            q = x[:, 0].float().unsqueeze(1) * self.ln_att[: upto + 1].float()  # (B, K, D)
            sim = (F.normalize(q, dim=-1) * F.normalize(self.ln_key[: upto + 1].float(), dim=-1)).sum(-1)  # (B, K)
        return sim.argmax(dim=1)  # (B,)


def inject_task_layernorm(model: nn.Module, n_tasks: int, target: str = r".*", selector: bool = False) -> list[str]:
    """Replace each ``nn.LayerNorm`` whose qualified name fully matches ``target`` by a ``TaskLayerNorm``.

    Returns the replaced module names (25 for ViT-B/16: ``blocks.i.norm1/norm2`` and ``norm``).
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and re.fullmatch(target, n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, TaskLayerNorm(getattr(parent, child), n_tasks, selector=selector))
    return names


def task_layernorms(model: nn.Module) -> list[TaskLayerNorm]:
    """The ``TaskLayerNorm`` modules of ``model`` in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, TaskLayerNorm)]


@torch.no_grad()
def copy_task_rows(model: nn.Module, src: int, dst: int) -> None:
    """Copy every per-task row (scale, bias and, if present, key and attention) of task ``src`` into ``dst``."""
    for m in task_layernorms(model):
        for p in m.parameters(recurse=False):
            p[dst].copy_(p[src])
