"""The early-convolution ViT of the PAD paper (Pelosin, Jha et al., CVPRW 2022, ``early_conv_vit_net.py``), built
from timm's ``VisionTransformer`` and registered with timm as ``early_conv_vit``.

Stem: four 3x3 stride-2 convolutions 3 -> 24 -> 48 -> 96 -> 196 (with bias, no norm or activation between them),
then a 1x1 convolution 196 -> 768; a 32x32 image becomes 2x2 = 4 tokens, 5 with CLS. Then 12 pre-norm blocks of
12 heads x 64 (``nn.LayerNorm`` eps 1e-5), MLP 2048 with GELU, qkv without bias, no dropout; the CLS token is the
output, with NO final norm. Trained from scratch: there are no pre-trained weights. Initialisation follows the
original: PyTorch's default for convs, linears and norms, standard normal for the CLS token and position embedding.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["ConvStem", "FACIL_IMAGENET32_MEAN", "FACIL_IMAGENET32_STD"]

FACIL_IMAGENET32_MEAN = (0.481, 0.457, 0.408)  # FACIL dataset_config.py, imagenet_32_reduced
FACIL_IMAGENET32_STD = (0.260, 0.253, 0.268)
STEM_CHANNELS = (24, 48, 96, 196)


class ConvStem(nn.Module):
    """Strided 3x3 convolutions and a 1x1 projection to tokens; timm's ``embed_layer`` interface."""

    def __init__(self, img_size: int = 32, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True, **_: object) -> None:  # fmt: skip
        super().__init__()
        chans = (in_chans, *STEM_CHANNELS)
        self.convs = nn.Sequential(*[nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1) for i in range(len(STEM_CHANNELS))])
        self.proj = nn.Conv2d(chans[-1], embed_dim, 1)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (16, 16)  # the stem's total stride
        self.grid_size = tuple(s // 16 for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return 16 if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // 16, img_size[1] // 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.convs(x))  # (B, D, H/16, W/16)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def _original_init(model: VisionTransformer) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.LayerNorm):
            m.reset_parameters()
    nn.init.normal_(model.cls_token)
    nn.init.normal_(model.pos_embed)


default_cfgs = generate_default_cfgs(
    {
        "early_conv_vit.untrained": dict(
            url="", num_classes=0, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear",
            mean=FACIL_IMAGENET32_MEAN, std=FACIL_IMAGENET32_STD, first_conv="patch_embed.convs.0",
            classifier="head",
        )
    }
)  # fmt: skip


@register_model
def early_conv_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """PAD's ImageNet-32 network; ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio`` may be overridden."""
    if pretrained:
        raise ValueError("early_conv_vit has no pre-trained weights (the PAD paper trains it from scratch); "
                         "set model.pretrained=false")  # fmt: skip
    args = dict(img_size=32, embed_dim=768, depth=12, num_heads=12, mlp_ratio=2048 / 768, qkv_bias=False,
                final_norm=False, class_token=True, global_pool="token", embed_layer=ConvStem,
                norm_layer=partial(nn.LayerNorm, eps=1e-5))  # fmt: skip
    model = build_model_with_cfg(VisionTransformer, "early_conv_vit", False, **(args | kwargs))
    _original_init(model)
    return model
