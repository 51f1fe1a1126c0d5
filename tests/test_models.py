import pytest
import timm
import torch
from safetensors.torch import save_file

from retain.models import TaskHeads, create_backbone, load_weights
from retain.models.vit import VIT32_ARCHS

from conftest import needs_shared

OURS = list(VIT32_ARCHS) + ["cifar_resnet20", "cifar_resnet32"]


@pytest.mark.parametrize("name", OURS)
def test_uniform_surface(name):
    model = create_backbone(name, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    final, inter = model.forward_intermediates(x)
    assert torch.allclose(final, feats, atol=1e-5)
    assert len(inter) >= 2 and all(torch.isfinite(t).all() for t in inter)


def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="has no pre-trained weights; set model.pretrained=false"):
        create_backbone("vit_nano_patch4_32", pretrained=True)


def test_unknown_backbone():
    with pytest.raises(KeyError, match="unknown backbone 'no_such_net'"):
        create_backbone("no_such_net")


def test_local_safetensors_weights_are_loaded(tmp_path):
    src = create_backbone("vit_nano_patch4_32", pretrained=False)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    x = torch.randn(2, 3, 32, 32)
    for f in ("w.safetensors", "w.pth"):
        dst = create_backbone("vit_nano_patch4_32", pretrained=False, weights=tmp_path / f)
        assert torch.equal(dst.eval()(x), src.eval()(x))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_weights(tmp_path / "evil.pth")


def test_task_heads_mask_unseen_tasks():
    heads = TaskHeads(4, [2, 3, 1])
    heads.n_active = 2
    logits = heads(torch.randn(5, 4))
    assert logits.shape == (5, 6)
    assert torch.isinf(logits[:, 5:]).all() and torch.isfinite(logits[:, :5]).all()


def test_cifar_resnet20_shared_weights_score_80_percent_on_jpeg_test_set():
    weights = needs_shared("weights", "resnet20-12fca82f.th")
    archive = needs_shared("cifar10-jpg.tar.gz")
    from retain.data import build_transform, create_dataset

    model = create_backbone("cifar_resnet20", pretrained=False, weights=weights)
    net = timm.create_model("cifar_resnet20", num_classes=10)
    state = load_weights(weights)
    net.load_state_dict(state)
    assert torch.equal(model.state_dict()["conv1.weight"], net.state_dict()["conv1.weight"])
    tf = build_transform(False, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    test = create_dataset("cifar10", "test", root=archive)
    x = torch.stack([tf(torch.from_numpy(im).permute(2, 0, 1)) for im in test.images])
    with torch.no_grad():
        pred = torch.cat([net.eval()(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    acc = (pred.numpy() == test.targets).mean() * 100
    assert acc >= 80.0, acc  # 81.0 % measured on these JPEG copies
