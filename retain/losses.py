"""Distillation terms as pure functions: LwF's knowledge distillation and POD / PAD pooled distillation.

``lwf_kd`` is FACIL's LwF cross-entropy (Li & Hoiem, ECCV 2016; Masana et al., TPAMI 2022). ``pod`` is the pooled
output distillation of PODNet (Douillard et al., ECCV 2020) as applied to ViT attention by Pelosin, Jha et al.
("Towards Exemplar-Free Continual Learning in Vision Transformers", CVPRW 2022), with their asymmetric variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["POOLINGS", "lwf_kd", "pool", "pod"]

POOLINGS = ("spatial", "height", "width", "gap", "pixel")


def lwf_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """FACIL's KD: ``-sum p_old log p_new`` with both softened by T (``softmax(z)^(1/T)`` renormalised, i.e.
    ``softmax(z / T)``), the student smoothed by ``1e-5 / C`` and renormalised; mean over the batch."""
    p_new = F.softmax(student_logits / T, dim=1)  # (B, C_old)
    p_old = F.softmax(teacher_logits / T, dim=1)
    p_new = p_new + 1e-5 / p_new.shape[1]
    p_new = p_new / p_new.sum(dim=1, keepdim=True)
    return -(p_old * p_new.log()).sum(dim=1).mean()


def pool(a: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool a per-head map ``a`` (B, H, X, Y) as the official code does (``olwf_asym.py`` / ``olwf_asympost.py``).

    ``height`` sums over dim 2 -> (B, H*Y) (for attention logits: over the queries); ``width`` over dim 3 ->
    (B, H*X); ``spatial`` concatenates height and width; ``gap`` averages X and Y -> (B, H); ``pixel`` keeps
    (B, H, X, Y).
    """
    B = a.shape[0]
    if pooling == "height":
        return a.sum(dim=2).reshape(B, -1)  # (B, H*Y)
    if pooling == "width":
        return a.sum(dim=3).reshape(B, -1)  # (B, H*X)
    if pooling == "spatial":
        return torch.cat([a.sum(dim=2).reshape(B, -1), a.sum(dim=3).reshape(B, -1)], dim=-1)  # (B, H*(X+Y))
    if pooling == "gap":
        return a.mean(dim=(2, 3))  # (B, H)
    if pooling == "pixel":
        return a
    raise ValueError(f"pooling={pooling!r}; valid: {', '.join(POOLINGS)}")


def pod(old: torch.Tensor, new: torch.Tensor, pooling: str = "spatial", asymmetric: bool = False,
        square: bool | None = None, normalize: bool = True) -> torch.Tensor:  # fmt: skip
    """Pooled distillation of one layer's maps (B, H, X, Y) from the frozen ``old`` model into ``new``.

    Symmetric (PODNet): square, pool, L2-normalise each row, then the mean over the batch of the L2 distance.
    Asymmetric (PAD): pool, L2-normalise, ``ReLU(old - new)`` and its L2 norm: only positions where the old model's
    pooled value exceeds the new one's are penalised. ``square`` overrides the squaring (``True`` with
    ``asymmetric`` reproduces ``olwf_asym_original.py``). With ``pixel`` pooling the official code normalises over
    dim 1 (heads) and takes the norm over the last dim, averaging the rest; so does this.
    """
    if old.shape != new.shape:
        raise ValueError(f"pod: old {tuple(old.shape)} and new {tuple(new.shape)} maps differ in shape")
    if square if square is not None else not asymmetric:
        old, new = old.pow(2), new.pow(2)
    a, b = pool(old, pooling), pool(new, pooling)  # (B, F) or (B, H, X, Y)
    if normalize:
        a, b = F.normalize(a, dim=1, p=2), F.normalize(b, dim=1, p=2)
    diff = F.relu(a - b) if asymmetric else a - b
    return torch.linalg.vector_norm(diff, dim=-1).mean()
