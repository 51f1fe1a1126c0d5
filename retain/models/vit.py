"""Small ViTs for 32x32 inputs (patch 4, 64 tokens + CLS), built from timm's ``VisionTransformer``.

Registered with timm so ``timm.create_model("vit_micro_patch4_32.retain_cifar10", pretrained=True)`` loads the
weights shipped in ``retain/weights`` (pre-trained by ``retain pretrain pretrain/vit_micro_cifar10``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

__all__ = ["WEIGHTS_DIR", "VIT32_ARCHS"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (embed_dim, depth, num_heads, mlp_ratio)
VIT32_ARCHS = {
    "vit_nano_patch4_32": (64, 2, 2, 2.0),
    "vit_micro_patch4_32": (128, 4, 4, 2.0),
    "vit_tiny_patch4_32": (192, 6, 3, 4.0),
}


def shipped_weights(tag_name: str) -> Path:
    """Path of a weight file shipped inside the package, e.g. ``vit_micro_patch4_32.retain_cifar10``."""
    return WEIGHTS_DIR / f"{tag_name}.safetensors"


def _cfg(**kwargs) -> dict:
    return dict(
        url="", num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="patch_embed.proj", classifier="head", **kwargs,
    )  # fmt: skip


default_cfgs = generate_default_cfgs(
    {f"{name}.untrained": _cfg() for name in VIT32_ARCHS}
    | {
        "vit_micro_patch4_32.retain_cifar10": _cfg(file=str(shipped_weights("vit_micro_patch4_32.retain_cifar10"))),
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    dim, depth, heads, mlp = VIT32_ARCHS[variant]
    args = dict(img_size=32, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp)
    args["norm_layer"] = partial(nn.LayerNorm, eps=1e-6)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **(args | kwargs)
    )


@register_model
def vit_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("vit_nano_patch4_32", pretrained, **kwargs)


@register_model
def vit_micro_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("vit_micro_patch4_32", pretrained, **kwargs)


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("vit_tiny_patch4_32", pretrained, **kwargs)
