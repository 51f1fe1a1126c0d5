"""Backbones by name over timm, with a registry of the exact pre-trained tags the paper presets use.

``create_backbone(name)`` accepts any timm name or tag (``vit_base_patch16_224.augreg_in21k_ft_in1k``) and our
own 32-px models (``vit_micro_patch4_32.retain_cifar10``, ``cifar_resnet20.akamaster_cifar10``). The returned module
has no classifier (``num_classes=0``) and timm's surface: ``forward_features``, ``forward_head(x, pre_logits=True)``,
``forward_intermediates``, ``num_features``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from retain.models import cifar_resnet as _cifar_resnet  # noqa: F401  (registers cifar_resnet* with timm)
from retain.models import early_conv_vit as _early_conv_vit  # noqa: F401  (registers early_conv_vit with timm)
from retain.models import vit as _vit  # noqa: F401  (registers vit_*_patch4_32 with timm)

__all__ = ["PRETRAINED_TAGS", "TagInfo", "create_backbone", "backbone_names", "data_config", "load_weights",
           "weights_file", "file_sha256", "check_sha256"]  # fmt: skip


@dataclass(frozen=True)
class TagInfo:
    """A pre-trained tag a paper preset relies on, with where its weights come from."""

    tag: str
    source: str
    used_by: str


PRETRAINED_TAGS: dict[str, TagInfo] = {
    t.tag: t
    for t in [
        TagInfo(
            "vit_base_patch16_224.augreg_in21k_ft_in1k",
            "AugReg IN-21k -> IN-1k @224 (timm/HF hub)",
            "LN tuning (De Min et al. 2023), L2P, DualPrompt",
        ),
        TagInfo("vit_base_patch16_224.augreg_in21k", "AugReg IN-21k (timm/HF hub)", "PEFT-ViT presets"),
        TagInfo("vit_base_patch16_224.orig_in21k", "original Google IN-21k (timm/HF hub)", "CL baselines"),
        TagInfo(
            "vit_base_patch16_224.dino",
            "DINO self-supervised IN-1k (timm/HF hub)",
            "Block expansion / LoRA retention (PEFT-ViT)",
        ),
        TagInfo("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "AugReg Ti/16 (timm/HF hub)", "PAD CIFAR script"),
        TagInfo("resnet18.tv_in1k", "torchvision ImageNet-1k (what timm 0.4.12 loaded for resnet18)", "ConFiT"),
        TagInfo("vit_micro_patch4_32.retain_cifar10", "shipped in retain/weights (retain pretrain)", "demo, tests"),
        TagInfo("cifar_resnet20.retain_cifar10", "shipped in retain/weights (retain pretrain)", "demo, tests"),
        TagInfo("cifar_resnet20.akamaster_cifar10", "akamaster/pytorch_resnet_cifar10 (GitHub)", "ConFiT, CPU"),
        TagInfo("cifar_resnet56.akamaster_cifar10", "akamaster/pytorch_resnet_cifar10 (GitHub)", "ConFiT, CPU"),
    ]  # fmt: skip
}


def backbone_names() -> list[str]:
    """Our registered architectures plus the pre-trained tags the presets use."""
    ours = timm.list_models(["vit_*_patch4_32", "cifar_resnet*", "early_conv_vit"])
    return sorted(set(ours) | set(PRETRAINED_TAGS))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or a .pth/.th/.bin file read with ``weights_only=True`` (no code unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}; pass an existing .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user error
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = reason if len(reason) <= 80 else reason[:79] + "…"
        raise ValueError(
            f"weights file {path} is not a readable weights file ({reason}); pass a .safetensors file "
            "or a .pth of tensors (loaded with torch.load weights_only=True: no code)"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (what weight cards list)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_file(name: str, pretrained: bool = True, weights: str | Path | None = None) -> Path | None:
    """The local file a backbone's weights come from: ``weights``, else a shipped tag's file; None for hub
    downloads and random initialisation."""
    if weights is not None:
        return Path(weights)
    if not pretrained:
        return None
    file = getattr(timm.models.get_pretrained_cfg(name), "file", None)
    return Path(file) if file else None


def check_sha256(name: str, pretrained: bool, weights: str | Path | None, expected: str | None) -> None:
    """ValueError unless the backbone's weights file has sha256 ``expected`` (nothing to check when None)."""
    if expected is None:
        return
    path = weights_file(name, pretrained, weights)
    if path is None:
        raise ValueError(f"model.sha256 is set but {name} has no local weights file to check; pass "
                         "model.weights=FILE or drop model.sha256")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}; pass an existing .safetensors or .pth file")
    actual = file_sha256(path)
    if actual != expected.lower():
        raise ValueError(f"weights file {path} has sha256 {actual}, not model.sha256={expected}: it is another file "
                         "(or a corrupt copy); fetch the right one or correct model.sha256")  # fmt: skip


def _check_shipped(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(name) if "." in name else None
    if cfg is None:
        arch = name.split(".")[0]
        tags = timm.list_pretrained(f"{arch}.*")
        cfg = timm.models.get_pretrained_cfg(tags[0]) if tags else None
    has_source = cfg is not None and any(getattr(cfg, k, None) for k in ("url", "file", "hf_hub_id"))
    if not has_source:
        raise ValueError(
            f"backbone {name!r} has no pre-trained weights; set model.pretrained=false, pass model.weights=FILE, "
            "or pick a tag from `retain list`"
        )
    file = getattr(cfg, "file", None)
    if file and not Path(file).is_file():
        raise FileNotFoundError(
            f"shipped weights for {name} are missing at {file}; reinstall retain, or build them with "
            f"`retain pretrain` (see the README)"
        )


def create_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a backbone without classifier.

    Args:
        name: timm model name or ``name.tag``.
        pretrained: load the tag's weights (timm downloads hub weights; shipped tags load from the package).
        weights: local weights file (safetensors or weights_only .pth); used instead of any download.
        **kwargs: passed to ``timm.create_model`` (e.g. ``depth=2, embed_dim=32`` for tests).
    """
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise KeyError(f"unknown backbone {name!r}; see `retain list` (any timm model name also works)")
    use_hub = pretrained and weights is None
    if use_hub:
        _check_shipped(name)
    model = timm.create_model(name, pretrained=use_hub, num_classes=0, **kwargs)
    if weights is not None:
        state = load_weights(weights)
        state = _adapt_state(model, state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"weights file {weights} does not fit {name}: {len(missing)} of its tensors are missing "
                f"or shaped differently (first: {missing[0]}); is it for another architecture? Pass "
                "weights of this model.backbone, or set model.backbone to the file's architecture"
            )
    return model


def _adapt_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run timm's own checkpoint filter for the architecture (e.g. .npz/orig ViT names), drop classifier keys."""
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    filt = getattr(module, "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            state = filt(state, model)
        except Exception:  # noqa: BLE001 - filter is a best-effort name mapping
            pass
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}


def data_config(model: nn.Module) -> dict:
    """Input size, mean, std, interpolation and crop_pct of the backbone's pre-trained tag (timm's data config)."""
    return timm.data.resolve_data_config({}, model=model)
