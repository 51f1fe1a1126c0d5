"""Device-side resize (retain.data.device_resize) against the CPU transform, on the shipped real CIFAR-10 images.

Per sample, both paths start from the same global-RNG seed: the native transform must make the same draws (same RNG
state afterwards) and its batch, resized by ``DeviceImages.to("cpu")``, must match the CPU transform's output up to
the uint8 path's integer rounding: measured on the 500 images (``python -m benchmarks.device_resize``) at most 1/255
per pixel (bilinear) and 1.12/255 (bicubic), mean 0.26-0.31/255. A flipped or differently seeded crop is far off
(negative controls).
"""

import pytest
import torch
from torch.utils.data import DataLoader, default_collate
from torch.utils.data._utils.pin_memory import pin_memory

from retain.data.datasets import ImageDataset
from retain.data.device_resize import DeviceImages, NativeCrop, build_native_transform, collate_native
from retain.data.samples import load_sample
from retain.data.transforms import build_transform

SIZE = 224
N = 64  # images per case (the benchmark measures all 500)
BOUND = {"bilinear": 1.0 / 255 + 1e-5, "bicubic": 1.15 / 255}  # max |device - CPU| per pixel, in [0, 1] units
MEAN_BOUND = 0.35 / 255
CASES = {  # the 224-px presets' transforms (train and test)
    "rrc 0.08": dict(train=True, augment="rrc", rrc_scale=(0.08, 1.0)),
    "rrc 0.05": dict(train=True, augment="rrc", rrc_scale=(0.05, 1.0)),
    "pad_rrc": dict(train=True, augment="pad_rrc"),
    "none crop": dict(train=False, resize="crop"),
    "none direct": dict(train=False, resize="direct"),
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(load_sample()["train_images"]).permute(0, 3, 1, 2).contiguous()  # (500, 3, 32, 32)


def both_paths(images: torch.Tensor, interpolation: str, seed_shift: int = 0, mean=None, std=None, **kw):
    """CPU transform outputs and the device path's outputs (on the CPU), sample i seeded with i on both paths
    (``seed_shift``: the native path's seed is i + shift). Checks the RNG state after each sample agrees."""
    cpu = build_transform(image_size=SIZE, mean=mean, std=std, interpolation=interpolation, **kw)
    native = build_native_transform(image_size=SIZE, mean=mean, std=std, interpolation=interpolation, **kw)
    outs, crops = [], []
    for i, image in enumerate(images):
        torch.manual_seed(i)
        outs.append(cpu(image))
        after_cpu = torch.get_rng_state()
        torch.manual_seed(i + seed_shift)
        crops.append(native(image))
        if seed_shift == 0:
            assert torch.equal(torch.get_rng_state(), after_cpu), f"image {i}: different RNG draws"
    return torch.stack(outs), crops  # (N, 3, S, S), NativeCrops


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("case", list(CASES))
def test_device_path_matches_cpu_transform(images, case, interpolation):
    ref, crops = both_paths(images[:N], interpolation, **CASES[case])
    x, y = collate_native([(c, 0) for c in crops])
    out = x.to("cpu")  # (N, 3, S, S)
    assert isinstance(x, DeviceImages) and out.shape == ref.shape == (N, 3, SIZE, SIZE) and out.dtype == torch.float32
    diff = (out - ref).abs()
    print(f"{case} {interpolation}: max {255 * diff.max():.3f}/255, mean {255 * diff.mean():.3f}/255")
    assert diff.max() <= BOUND[interpolation]
    assert diff.mean() <= MEAN_BOUND
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(y, torch.zeros(N, dtype=torch.int64))


def test_negative_controls_a_wrong_flip_or_seed_is_far_off(images):
    ref, crops = both_paths(images[:32], "bilinear", **CASES["rrc 0.08"])
    flipped = [NativeCrop(_unflip(c), c.size, c.target, c.spec) for c in crops]  # the other flip decision
    _, reseeded = both_paths(images[:32], "bilinear", seed_shift=1000, **CASES["rrc 0.08"])
    for wrong in (flipped, reseeded):
        per_image = (collate_native(wrong).to("cpu") - ref).abs().amax(dim=(1, 2, 3))  # (32,)
        assert (per_image > 20 * BOUND["bilinear"]).float().mean() >= 0.9, per_image
    assert (collate_native(crops).to("cpu") - ref).abs().max() <= BOUND["bilinear"]  # the right ones still pass


def _unflip(crop: NativeCrop) -> torch.Tensor:
    h, w = crop.size
    canvas = crop.canvas.clone()
    canvas[:, :h, :w] = canvas[:, :h, :w].flip(-1)
    return canvas


def test_normalisation_and_the_canvas(images):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref, crops = both_paths(images[:8], "bicubic", mean=mean, std=std, **CASES["pad_rrc"])
    out = collate_native(crops).to("cpu", non_blocking=True)
    assert (out - ref).abs().max() <= BOUND["bicubic"] / min(std)
    assert (out - ref).abs().max() > 0.2 / 255 / max(std)  # the CPU path rounds, the device path does not
    c = crops[0]
    h, w = c.size
    assert c.canvas.shape == (3, 40, 40) and c.canvas.dtype == torch.uint8 and c.target == (SIZE, SIZE, 0, 0)
    assert torch.equal(c.canvas[:, h:, :w], c.canvas[:, h - 1 : h, :w].expand(-1, 40 - h, -1))  # edge-replicated
    assert torch.equal(c.canvas[:, :, w:], c.canvas[:, :, w - 1 : w].expand(-1, -1, 40 - w))


def test_eval_geometry_mixed_sizes_and_downsampling():
    # Resize(256) + CenterCrop(224) of a 32-px image: the whole image resized to 256, window at (16, 16)
    native = build_native_transform(False, SIZE, None, None, resize="crop", interpolation="bicubic")
    assert native(torch.zeros(3, 32, 32, dtype=torch.uint8)).target == (256, 256, 16, 16)
    assert native(torch.zeros(3, 32, 48, dtype=torch.uint8)).target == (256, 384, 16, 80)
    # canvases of different sizes in one batch (zero-padded), upsampled and antialiased-downsampled to 40 px
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 32), (40, 52), (96, 72), (41, 40)]
    imgs = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in shapes]
    for resize, interpolation in [("direct", "bilinear"), ("crop", "bicubic")]:
        cpu = build_transform(False, 40, None, None, resize=resize, interpolation=interpolation)
        native = build_native_transform(False, 40, None, None, resize=resize, interpolation=interpolation)
        x = collate_native([native(im) for im in imgs])
        assert x.canvases.shape == (4, 3, 96, 72)
        diff = (x.to("cpu") - torch.stack([cpu(im) for im in imgs])).abs()
        assert diff.max() <= BOUND[interpolation], (resize, interpolation, 255 * diff.max())


def test_crop_flip_is_refused_in_training_only(images):
    with pytest.raises(ValueError, match="crop_flip.*output resolution"):
        build_native_transform(True, SIZE, None, None, augment="crop_flip")
    ref, crops = both_paths(images[:4], "bilinear", train=False, augment="crop_flip", resize="crop")
    assert (collate_native(crops).to("cpu") - ref).abs().max() <= BOUND["bilinear"]
    with pytest.raises(ValueError, match="invalid augment"):
        build_native_transform(True, SIZE, None, None, augment="bogus")
    with pytest.raises(TypeError, match="uint8"):
        build_native_transform(True, SIZE, None, None, augment="rrc")(torch.zeros(3, 8, 8))


def test_collate_falls_back_and_the_loader_pins(images, monkeypatch):
    plain = [(torch.full((3, 2, 2), float(i)), i) for i in range(3)]
    got, want = collate_native(plain), default_collate(plain)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    sample = load_sample()
    native = build_native_transform(True, SIZE, (0.5,) * 3, (0.5,) * 3, augment="rrc", interpolation="bicubic")
    data = ImageDataset(sample["train_targets"][:12], list(sample["classes"]), images=sample["train_images"][:12],
                        transform=native)  # fmt: skip
    x, y = next(iter(DataLoader(data, batch_size=6, collate_fn=collate_native, num_workers=1)))
    assert isinstance(x, DeviceImages) and len(x) == 6 and x.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(y, torch.as_tensor(sample["train_targets"][:6]))
    assert x.nbytes == 6 * 3 * 32 * 32 + 6 * 6 * 8  # uint8 canvases + sizes and targets, vs 6 * 602,112 bytes
    out = x.to("cpu")
    assert out.shape == (6, 3, SIZE, SIZE) and -1 <= out.min() < out.max() <= 1

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t) or t.clone())
    px, py = pin_memory((x, y))  # what DataLoader(pin_memory=True)'s thread does with a batch
    assert isinstance(px, DeviceImages) and len(pinned) == 4  # canvases, sizes, targets, labels
    assert torch.equal(px.canvases, x.canvases) and px.canvases is not x.canvases
    assert torch.equal(px.to("cpu"), out) and torch.equal(py, y)


def test_resample_under_a_lower_matmul_precision_restores_it(images):  # TF32 itself: test_cuda_matches_cpu
    ref, crops = both_paths(images[:8], "bicubic", **CASES["rrc 0.05"])
    torch.set_float32_matmul_precision("medium")
    try:
        out = collate_native(crops).to("cpu")
        assert torch.get_float32_matmul_precision() == "medium"  # restored
    finally:
        torch.set_float32_matmul_precision("highest")
    assert (out - ref).abs().max() <= BOUND["bicubic"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(images):
    ref, crops = both_paths(images[:32], "bicubic", **CASES["rrc 0.05"])
    x = collate_native(crops).pin_memory()
    torch.set_float32_matmul_precision("high")  # TF32: the resample must not inherit it
    try:
        out = x.to("cuda", non_blocking=True).cpu()
    finally:
        torch.set_float32_matmul_precision("highest")
    assert (out - ref).abs().max() <= BOUND["bicubic"]
    assert (out - x.to("cpu")).abs().max() < 1e-5
