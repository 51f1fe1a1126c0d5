"""PAD: pooled attention / functional distillation on top of LwF (Pelosin, Jha et al., "Towards Exemplar-Free
Continual Learning in Vision Transformers: an Account of Attention, Functional and Weight Regularization", CVPRW 2022).

Trained: the whole backbone and the current task's head (old heads frozen: no exemplars), as LwF. From the second
task on, the loss adds to LwF's CE + KD a distillation of every block's attention from the frozen model of the
previous task: the pre-softmax logits ``QK^T/sqrt(d)`` (``variant: attentional``) or the per-head context
``softmax(.)V`` (``functional``), pooled (``pooling``) and compared by POD (symmetric) or by its asymmetric form,
which penalises only what the new model lost (``retain.losses.pod``), times ``mu`` and averaged over the layers.

Precision: the recorded maps and the PAD term are float32 whatever the autocast (bf16 on a GPU by default): the
logits are recomputed in float32 from the (bf16) q and k, the context is cast, and pooling, normalisation and the
distance run with autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retain.config import ConfigError
from retain.losses import POOLINGS, lwf_kd, pod
from retain.methods.base import Stage, register_method
from retain.methods.lwf import LwF, LwFConfig
from retain.models.attention import AttentionRecord, attention_modules, record_attention

__all__ = ["PADConfig", "PAD", "pad_loss"]

VARIANTS = ("attentional", "functional")


@dataclass
class PADConfig(LwFConfig):
    """LwF's options (``lamb``, ``temperature``, current-head CE) plus the PAD term's."""

    name: str = "pad"
    variant: str = "functional"  # attentional: pre-softmax QK^T/sqrt(d) | functional: softmax(.)V per head
    asymmetric: bool = True  # False: symmetric POD (square, pool, normalise, L2)
    pooling: str = "spatial"  # spatial | height | width | gap | pixel (FACIL's --pool-along, default spatial)
    mu: float = 1.0  # --plast_mu
    layers: list[int] | None = None  # blocks distilled (None: all); the divisor is their number
    square: bool | None = None  # None: square only when symmetric; True with asymmetric = olwf_asym_original.py


def pad_loss(old: list[torch.Tensor], new: list[torch.Tensor], pooling: str, asymmetric: bool,
             square: bool | None = None) -> torch.Tensor:  # fmt: skip
    """Mean over layers of ``pod(old_l, new_l)``, in float32 whatever the autocast."""
    with torch.autocast(old[0].device.type, enabled=False):
        terms = [pod(a.float(), b.float(), pooling, asymmetric, square) for a, b in zip(old, new, strict=True)]
        return torch.stack(terms).mean()


@register_method
class PAD(LwF):
    """LwF + PAD; see the module docstring."""

    config_class = PADConfig
    compile_blocker = "its attention records hook inside the backbone"

    def __init__(self, cfg: PADConfig, model, scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        _check(cfg, len(attention_modules(model.backbone)))

    def _maps(self, rec: AttentionRecord) -> list[torch.Tensor]:
        maps = rec.logits if self.cfg.variant == "attentional" else rec.context
        return maps if self.cfg.layers is None else [maps[i] for i in self.cfg.layers]

    def _record(self, model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        att = self.cfg.variant == "attentional"
        with record_attention(model.backbone, logits=att, context=not att, float32=True) as rec:
            logits = model(x)  # (B, C)
        return logits, self._maps(rec)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        x, y = batch
        offset = self.task.offset
        if self.old_model is None or offset == 0:
            return {"ce": F.cross_entropy(self.mask_logits(self.model(x)), y)}
        # FACIL's validation loss is CE + KD: the PAD term is a training term only
        distil = self.model.training and self.cfg.mu != 0
        logits, new = self._record(self.model, x) if distil else (self.model(x), [])
        with torch.no_grad():
            old_logits, old = self._record(self.old_model, x) if distil else (self.old_model(x), [])
        terms = {
            "ce": F.cross_entropy(self.mask_logits(logits), y),
            "kd": self.cfg.lamb * lwf_kd(logits[:, :offset], old_logits[:, :offset], self.cfg.temperature),
        }
        if distil:
            terms["pad"] = self.cfg.mu * pad_loss(old, new, self.cfg.pooling, self.cfg.asymmetric, self.cfg.square)
        return terms  # fmt: skip


def _check(cfg: PADConfig, n_blocks: int) -> None:
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"method.variant={cfg.variant!r}; valid: {', '.join(VARIANTS)}")
    if cfg.pooling not in POOLINGS:
        raise ConfigError(f"method.pooling={cfg.pooling!r}; valid: {', '.join(POOLINGS)}")
    bad = [i for i in cfg.layers or [] if not -n_blocks <= i < n_blocks]
    if bad:
        raise ConfigError(
            f"method.layers={cfg.layers}: the backbone has {n_blocks} blocks (indices 0..{n_blocks - 1})"
        )
