"""CIFAR ResNets of He et al. (2016, Sec. 4.2): 3 stages of BasicBlocks with 16/32/64 channels and the
parameter-free "option A" shortcut. State dicts match the widely used akamaster/pytorch_resnet_cifar10 weights.

Registered with timm (``timm.create_model("cifar_resnet20")``) and exposing timm's surface:
``forward_features`` (B, 64, 8, 8), ``forward_head(x, pre_logits=...)``, ``num_features``, ``reset_classifier``,
``forward_intermediates``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet", "BasicBlock"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, **kwargs) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.num_features = self.head_hidden_size = 64
        self.num_classes = num_classes
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=16, reduction=1, module="layer1"),
            dict(num_chs=32, reduction=2, module="layer2"),
            dict(num_chs=64, reduction=4, module="layer3"),
        ]
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, intermediates_only: bool = False
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (after layer1..3); ``indices`` as in timm (an int takes the last n)."""
        take = list(range(3)) if indices is None else indices
        take = list(range(3 - take, 3)) if isinstance(take, int) else take
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        feats = []
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3)):
            x = stage(x)
            if i in take:
                feats.append(x)
        return feats if intermediates_only else (x, feats)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        return self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, 64)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _filter_akamaster(state_dict: dict, model: nn.Module) -> dict:
    """Strip the DataParallel ``module.`` prefix of the akamaster checkpoints (``{"state_dict": ...}``)."""
    state_dict = state_dict.get("state_dict", state_dict)
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _cfg(url: str = "", **kwargs) -> dict:
    return dict(
        url=url, num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, interpolation="bilinear",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="conv1", classifier="linear", **kwargs,
    )  # fmt: skip


_HASHES = {20: "12fca82f", 32: "d509ac18", 44: "014dd654", 56: "4bfd9763"}
default_cfgs = generate_default_cfgs(
    {f"cifar_resnet{d}.akamaster_cifar10": _cfg(AKAMASTER_URL + f"resnet{d}-{h}.th") for d, h in _HASHES.items()}
    | {"cifar_resnet20.retain_cifar10": _cfg(file=str(_WEIGHTS_DIR / "cifar_resnet20.retain_cifar10.safetensors"))}
)


def _create(variant: str, depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, depth=depth, pretrained_filter_fn=_filter_akamaster, **kwargs
    )


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet20", 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet32", 32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet44", 44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet56", 56, pretrained, **kwargs)
