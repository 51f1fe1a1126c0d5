"""Feature extraction and weighted k-NN, shared by the engine (retention probe) and methods (caches, prototypes)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from retain import distributed

__all__ = ["extract_features", "weighted_knn_accuracy"]


@torch.no_grad()
def extract_features(
    forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device
) -> TensorDataset:
    """(features (N, D) float32 on the CPU, labels (N,)) of every batch of ``loader`` through ``forward``.

    The caller puts the model in eval mode (``Method.extract_features`` does, and restores the previous mode).
    Under several processes ``loader`` is this process's shard (``RunContext.pass_loader``): the shards are
    gathered in rank order, so every process holds the whole set in the one-process order.
    """
    feats, labels = [], []
    for x, y in loader:
        feats.append(forward(x.to(device)).float().cpu())  # (B, D)
        labels.append(y)
    feats, labels = _cat(feats), _cat(labels)  # (N_r, D), (N_r,)
    return TensorDataset(distributed.gather_rows(feats), distributed.gather_rows(labels))


def _cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """``torch.cat``, or None for an empty shard (more processes than batches; ``gather_rows`` accepts it)."""
    return torch.cat(parts) if parts else None


@torch.no_grad()
def weighted_knn_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> float:  # fmt: skip
    """DINO's weighted k-NN (Caron et al. 2021, ``eval_knn.py``): percent of test samples whose vote
    ``sum_j exp(cos_j / T)`` over the k nearest L2-normalised train features is right."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    bank = F.normalize(train_feats.float(), dim=1)  # (N, D)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start : start + chunk].float(), dim=1)  # (b, D)
        sims, idx = (q @ bank.T).topk(k, dim=1)  # (b, k)
        weights = (sims / temperature).exp()  # (b, k)
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, train_labels[idx], weights)  # (b, C)
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return 100.0 * correct / len(test_feats)
