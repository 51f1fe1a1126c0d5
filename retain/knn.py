"""Weighted k-NN classification of L2-normalised features (DINO, Caron et al. 2021, ``eval_knn.py``).

Used to measure how much of the pre-training domain a fine-tuned backbone retains (PEFT-ViT block expansion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["weighted_knn_accuracy"]


@torch.no_grad()
def weighted_knn_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> float:  # fmt: skip
    """Percent of test samples whose vote ``sum_j exp(cos_j / T)`` over the k nearest train samples is right."""
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
