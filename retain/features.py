"""Feature extraction and weighted k-NN, shared by the engine (retention probe) and methods (caches, prototypes)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from retain import distributed

__all__ = ["extract_features", "extract_features_to_main", "weighted_knn_accuracy"]


@torch.no_grad()
def extract_features(
    forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device
) -> TensorDataset:
    """(features (N, D) float32 on the CPU, labels (N,)) of every batch of ``loader`` through ``forward``.

    The caller puts the model in eval mode (``Method.extract_features`` does, and restores the previous mode).
    Under several processes ``loader`` is this process's shard (``RunContext.pass_loader``): the shards are
    gathered in rank order, so every process holds the whole set in the one-process order.
    """
    feats, labels = _shard(forward, loader, device, on_device=False)  # (N_r, D), (N_r,)
    return TensorDataset(distributed.gather_rows(feats), distributed.gather_rows(labels))


@torch.no_grad()
def extract_features_to_main(
    forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """``extract_features`` for a pass whose result one process reads (the retention probe): ``forward`` under
    ``autocast``, (features (N, D) float32, labels (N,)) on ``device`` on rank 0 alone (None on the others), in the
    one-process order; no process holds more than its shard of the set in host memory unless ``device`` is the CPU."""
    feats, labels = _shard(forward, loader, device, on_device=True, autocast=autocast)  # (N_r, D), (N_r,)
    feats, labels = distributed.gather_rows_to_main(feats), distributed.gather_rows_to_main(labels)
    return None if feats is None else (feats, labels)


def _shard(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device, on_device: bool,
           autocast: AbstractContextManager | None = None) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """This process's (features float32, labels), on ``device`` when ``on_device`` else on the CPU."""
    feats, labels = [], []
    with autocast or nullcontext():
        for x, y in loader:
            f = forward(x.to(device)).float()  # (B, D)
            feats.append(_compact(f if on_device else f.cpu()))
            labels.append(y.to(device) if on_device else y)
    return _cat(feats), _cat(labels)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in storage of its own size: a view into a larger tensor (a ViT's CLS token ``x[:, 0]`` of its
    (B, N, D) tokens) would keep the whole of it alive for as long as the features are kept."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """``torch.cat``, or None for an empty shard (more processes than batches; ``gather_rows`` accepts it)."""
    return torch.cat(parts) if parts else None


@torch.no_grad()
def weighted_knn_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024, in_place: bool = False,
) -> float:  # fmt: skip
    """DINO's weighted k-NN (Caron et al. 2021, ``eval_knn.py``): percent of test samples whose vote
    ``sum_j exp(cos_j / T)`` over the k nearest L2-normalised train features is right.

    Runs where ``train_feats`` lives (the labels are moved there). ``in_place``: normalise the float32
    ``train_feats`` in place (the caller's bank, not read afterwards) instead of in a copy; the same numbers.
    """
    dev = train_feats.device
    train_labels, test_labels = train_labels.to(dev), test_labels.to(dev)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    own = in_place and train_feats.dtype == torch.float32
    bank = _normalize_(train_feats) if own else F.normalize(train_feats.float(), dim=1)  # (N, D)
    k = min(k, len(bank))
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start : start + chunk].to(dev).float(), dim=1)  # (b, D)
        sims, idx = (q @ bank.T).topk(k, dim=1)  # (b, k)
        weights = (sims / temperature).exp()  # (b, k)
        votes = torch.zeros(len(q), n_classes, device=dev).scatter_add_(1, train_labels[idx], weights)  # (b, C)
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum()
    return 100.0 * int(correct) / len(test_feats)


def _normalize_(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=1)`` in place: the same division by the same clamped norms, without a second copy."""
    return x.div_(x.norm(2, dim=1, keepdim=True).clamp_min(eps))
