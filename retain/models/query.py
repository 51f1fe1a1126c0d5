"""The query service of the methods that select by key (LN tuning; L2P, DualPrompt and CODA-Prompt, PROMPTS.md
§1.3): q(x) = the frozen pre-trained ViT's CLS token after its final norm, without gradient, in float32 whatever the
autocast, computed once per batch and shared by a method's selection and key loss; with the cache on, once per image
per run, keyed by the image's content computed where the batch lives (exact integer projections of its bytes: only a
few numbers per image go to the host, no copy of the batch and no hash).

- ``QueryService(frozen)``: ``service(x)`` (B, D), cached; ``service(x, cache=False)`` recomputes.
- ``frozen_cls(vit)``: the plain ``frozen`` pass of a timm ViT (eval mode, no prompt or prefix set, float32).
- ``key_similarity(query, keys)``: the float32 cosine of queries and keys that selects a task or a prompt.
- ``image_keys(x, weights)``, ``key_weights(n, device)``: the content keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QueryService", "frozen_cls", "key_similarity", "image_keys", "key_weights"]

KEY_SEED = 0x1A7E_C0DE  # the projections are fixed: the same image gets the same key in every run
KEY_BITS = 112  # two different images share a key with probability <= 2^-112 (``key_weights``)
KEY_CHUNK = {"cpu": 2**18, "cuda": 2**24}  # elements of the float64 copy made at a time (CPU: fits L2)


def key_weights(n: int, device: torch.device) -> torch.Tensor:
    """(n, k) integer-valued float64 projections for images of n 16-bit words, from a private seeded generator (the
    global RNG is neither read nor advanced).

    Each weight is uniform in [0, 2^b) with n * 2^15 * 2^b <= 2^53: every product and partial sum of a projection of
    the words (|word| <= 2^15) is an integer that float64 holds exactly, so the key is the same whatever the order of
    the reduction (batch size, kernel, chunking, device). Two different images differ by d != 0 in some word j; given
    the other weights, at most one of the 2^b values of weight (j, c) makes projection c of d vanish, so the images
    share one projection with probability <= 2^-b and all k (independent columns) with probability <= 2^-(b k) <=
    2^-112, for images not built from the seed: below 2^-73 over all pairs of a run of 2^20 distinct images.
    """
    bits = min(31, 38 - (n - 1).bit_length())  # 224 px float32: n = 301,056, b = 19, k = 6 (14 MB)
    gen = torch.Generator().manual_seed(KEY_SEED)
    w = torch.randint(0, 2**bits, (n, -(-KEY_BITS // bits)), generator=gen, dtype=torch.float64)
    return w.to(device)


def image_keys(x: torch.Tensor, weights: dict[tuple, torch.Tensor]) -> list[bytes]:
    """One key per sample of x (B, ...): exact integer projections of its bytes, computed where x lives; only
    (B, k) numbers go to the host. ``weights`` caches ``key_weights`` per (words, device)."""
    words = x.detach().contiguous().flatten(1).view(torch.uint8)  # (B, bytes), any dtype
    words = words.view(torch.int16) if words.shape[1] % 2 == 0 else words  # (B, n), |value| <= 2^15
    n = words.shape[1]
    if (n, x.device) not in weights:
        weights[n, x.device] = key_weights(n, x.device)
    w = weights[n, x.device]  # (n, k)
    step = max(1, KEY_CHUNK.get(x.device.type, 2**24) // max(1, len(x)))
    keys = sum(words[:, s : s + step].double() @ w[s : s + step] for s in range(0, n, step))  # (B, k), exact
    head = f"{x.dtype}{tuple(x.shape[1:])}".encode()
    return [head + row.tobytes() for row in keys.cpu().numpy()]


class QueryService:
    """q(x) for a method: ``frozen(x)`` (B, ...) -> (B, D), the frozen pass (its caller's routing, mode and precision),
    through a per-image cache held on the host (``cache``; ``clear()`` empties it, e.g. on resume)."""

    def __init__(self, frozen: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.frozen = frozen
        self.cache: dict[bytes, torch.Tensor] = {}  # image key -> query (host)
        self.key_weights: dict[tuple, torch.Tensor] = {}  # (words per image, device) -> (words, k) projections
        self.frozen_images = 0  # images that went through the frozen pass (tests, benchmarks)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cache: bool = True) -> torch.Tensor:
        """(B, D) queries of x (B, ...); from the cache where an image was seen (``cache``), else computed."""
        if not cache:
            return self._frozen(x)
        keys = image_keys(x, self.key_weights)
        miss = [i for i, k in enumerate(keys) if k not in self.cache]
        if miss:
            fresh = self._frozen(x[miss]).cpu()  # (M, D)
            for i, q in zip(miss, fresh, strict=True):
                self.cache[keys[i]] = q
        return torch.stack([self.cache[k] for k in keys]).to(x.device)  # (B, D)

    def _frozen(self, x: torch.Tensor) -> torch.Tensor:
        self.frozen_images += len(x)
        return self.frozen(x)

    def clear(self) -> None:
        self.cache.clear()


def frozen_cls(vit: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The query pass of a timm ViT: ``vit.forward_features(x)[:, 0]`` (B, D) in eval mode (restored after) and
    float32 with autocast off; prompts and prefixes are off unless a caller sets them around it."""

    def frozen(x: torch.Tensor) -> torch.Tensor:
        was_training = vit.training
        vit.eval()
        try:
            with torch.autocast(x.device.type, enabled=False):
                return vit.forward_features(x.float())[:, 0]  # (B, D)
        finally:
            vit.train(was_training)

    return frozen


def key_similarity(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, M) cosine of queries (B, D) and keys (M, D), in float32 whatever the autocast (a bf16 matmul would round
    near-ties differently): the selection score of LN tuning and DualPrompt."""
    with torch.autocast(query.device.type, enabled=False):
        return F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # (B, M)
