"""The names ``retain list`` prints, readable without importing torch, timm or torchvision (stdlib only).

The registries themselves are filled by importing the modules that define their entries (``retain.methods``,
``retain.data``, ``retain.models``), which load torch: seconds, on every ``retain list``. This module holds the
same names as plain data; ``tests/test_cli_fast.py`` checks each against the real registry, so a method, dataset,
architecture or pre-trained tag added in one place and not here fails the tests.
"""

from __future__ import annotations

__all__ = ["METHOD_NAMES", "DATASET_NAMES", "ARCHITECTURES", "ARCHITECTURE_PATTERNS", "PRETRAINED_TAGS",
           "backbone_names"]  # fmt: skip

# retain.methods.METHODS (= retain.config.METHOD_CONFIGS), sorted
METHOD_NAMES: tuple[str, ...] = ("block_expansion", "coda_prompt", "confit", "dualprompt", "ewc", "finetune",
                                 "joint", "l2p", "linear_probe", "ln_tuning", "lora", "lwf", "pad",
                                 "simplecil")  # fmt: skip

# retain.data.DATASETS, sorted
DATASET_NAMES: tuple[str, ...] = ("caltech101", "cifar10", "cifar100", "cifar10_sample", "digits", "fashion_mnist",
                                  "imagefolder", "imagenet32", "synthetic")  # fmt: skip

# the timm patterns our architectures match (retain.models.backbones.backbone_names) and what they list, sorted
ARCHITECTURE_PATTERNS: tuple[str, ...] = ("vit_*_patch4_32", "cifar_resnet*", "early_conv_vit")
ARCHITECTURES: tuple[str, ...] = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
                                  "early_conv_vit", "vit_micro_patch4_32", "vit_nano_patch4_32",
                                  "vit_tiny_patch4_32")  # fmt: skip

# retain.models.backbones.PRETRAINED_TAGS: tag -> (source, used_by)
PRETRAINED_TAGS: dict[str, tuple[str, str]] = {
    "vit_base_patch16_224.augreg_in21k_ft_in1k": (
        "AugReg IN-21k -> IN-1k @224 (timm/HF hub)",
        "LN tuning (De Min et al. 2023), L2P, DualPrompt",
    ),
    "vit_base_patch16_224.augreg_in21k": ("AugReg IN-21k (timm/HF hub)", "PEFT-ViT presets"),
    "vit_base_patch16_224.orig_in21k": ("original Google IN-21k (timm/HF hub)", "CL baselines"),
    "vit_base_patch16_224.dino": (
        "DINO self-supervised IN-1k (timm/HF hub)",
        "Block expansion / LoRA retention (PEFT-ViT)",
    ),
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k": ("AugReg Ti/16 (timm/HF hub)", "PAD CIFAR script"),
    "resnet18.tv_in1k": ("torchvision ImageNet-1k (what timm 0.4.12 loaded for resnet18)", "ConFiT"),
    "vit_micro_patch4_32.retain_cifar10": ("shipped in retain/weights (retain pretrain)", "demo, tests"),
    "cifar_resnet20.retain_cifar10": ("shipped in retain/weights (retain pretrain)", "demo, tests"),
    "cifar_resnet20.akamaster_cifar10": ("akamaster/pytorch_resnet_cifar10 (GitHub)", "ConFiT, CPU"),
    "cifar_resnet56.akamaster_cifar10": ("akamaster/pytorch_resnet_cifar10 (GitHub)", "ConFiT, CPU"),
}


def backbone_names() -> list[str]:
    """Our architectures plus the pre-trained tags the presets use (= ``retain.models.backbone_names()``)."""
    return sorted(set(ARCHITECTURES) | set(PRETRAINED_TAGS))
