"""The query service (retain.models.query): q(x) = the frozen ViT's CLS after its final norm, float32, once per
image with the cache; the same pass whatever the model's mode, and prompt seams off unless set around it."""

import timm
import torch

from retain.models.prompting import add_prefix_attention, prefixes
from retain.models.query import QueryService, frozen_cls


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=0, drop_rate=0.3)  # fmt: skip


def test_frozen_cls_is_the_eval_mode_cls_after_the_final_norm_and_restores_the_mode():
    vit, x = _vit(), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = vit.eval().forward_features(x)[:, 0]  # (B, D)
    vit.train()
    q = frozen_cls(vit)(x)
    assert torch.equal(q, expected) and q.dtype == torch.float32 and vit.training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(frozen_cls(vit)(x), expected)  # autocast off inside


def test_the_service_caches_per_image_and_prefixes_change_the_query_only_when_set():
    vit, x = _vit(), torch.rand(4, 3, 32, 32)
    add_prefix_attention(vit, [0])
    service = QueryService(frozen_cls(vit))
    q = service(x)
    assert torch.equal(service(x.flip(0)), q.flip(0)) and service.frozen_images == 4  # hits in another order
    p = torch.randn(1, 2, 3, 16)
    with prefixes(vit, {0: (p, p)}):
        assert not torch.allclose(service(x, cache=False), q)  # a caller's prefix is seen: set none around queries
    assert torch.equal(service(x, cache=False), q) and service.frozen_images == 12
    service.clear()
    assert torch.equal(service(x), q) and service.frozen_images == 16 and len(service.cache) == 4
