"""Device-side resize for small images upsampled to ``image_size`` (issue #20 item 4).

The CPU path (:func:`retain.data.transforms.build_transform`) turns a uint8 (3, H, W) image into a float32
(3, S, S) tensor per sample, and that tensor (602 KB at S = 224) is what crosses to the GPU. Here the CPU keeps only
what is random and cheap, at the native resolution, and the device does the resize, the scaling and the
normalisation for the whole batch:

- CPU (per sample, :func:`build_native_transform`): [``Pad(4)``], RandomResizedCrop's draw of (top, left, h, w)
  by torchvision's own ``make_params``, the crop, and the flip's ``torch.rand(1)``: the same draws, in the same
  order, from the global RNG as the CPU transform, so a seeded run picks the same crops and flips either way. The
  crop (flipped if the flip fired) goes into a uint8 canvas of fixed size (the image's, or the padded image's) at
  the top-left, edge-replicated over the rest: 3 KB for a 32-px image (4.8 KB padded).
- device (per batch, :meth:`DeviceImages.to`): one separable resample of every crop to S x S as two batched
  matmuls with per-sample weight matrices (B, S, Hc) and (B, S, Wc) built from the crop sizes; then /255 and
  Normalize. Meant for an accelerator: on one CPU core it costs about as much as the CPU transform (dense weights).

Why it is the same image: the CPU RandomResizedCrop already crops the native (padded) image and resizes only the
crop (``resized_crop`` = crop, then ``resize(antialias=True)``), and the flip that follows commutes with that resize
(its weights are mirror-symmetric). The weight matrices are PyTorch's antialiased resize kernel itself: output
pixel o reads around centre ``scale * (o + 0.5)`` (align_corners=False, ``scale = h / S``), the window is cut to the
crop and the weights renormalised (so the canvas outside the crop never counts); triangle filter for bilinear,
Keys cubic with a = -0.5 for bicubic (the PIL kernel that ``antialias=True`` uses, not the -0.75 of the
non-antialiased mode); support widened by the scale when downsampling. The horizontal pass runs first and is
clamped to [0, 255] before the vertical one, as the uint8 CPU kernel saturates its intermediate (this matters for
bicubic's overshoot). Evaluation ``resize="crop"`` (Resize of the short side to int(S / 0.875), CenterCrop(S)) is
the same resample of the whole image to the resized size, evaluated on the centre window only.

What differs: the CPU uint8 kernels work in fixed point and round to integers; the device result is not rounded.
On the 500 real CIFAR-10 images shipped with the package the difference is at most 1/255 (bilinear) and 1.12/255
(bicubic) per pixel, 0.26-0.31/255 on average (``tests/test_device_resize.py``,
``python -m benchmarks.device_resize``). Not decomposable: ``augment="crop_flip"`` in training (its RandomCrop with
padding 4 runs after the resize, at the output resolution).

Presets served: ``peft_vit/cifar100_*`` (rrc (0.08, 1) bilinear; test
Resize((224, 224))), ``ln_tuning/cifar100*`` (rrc (0.05, 1) bicubic; test Resize(256) + CenterCrop(224), bicubic),
``confit/cifar100`` (no augmentation, Resize(256) + CenterCrop(224), bilinear): 32-px CIFAR-100 at 224 px; the
test transform of ``pad/cifar100_*`` (Resize((224, 224))), not its training one (FACIL's ``cifar100_224`` pads and
crops the image resized to 224 px). ``pad_rrc`` (Pad(4) + RandomResizedCrop at the native size) is supported too.

    tf = build_native_transform(True, 224, mean, std, augment="rrc")     # dataset transform: uint8 -> NativeCrop
    loader = DataLoader(dataset, batch_size=128, collate_fn=collate_native, pin_memory=True)
    for x, y in loader:
        x = x.to("cuda", non_blocking=True)                               # (B, 3, 224, 224) float32, normalised
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._geometry import (
    _center_crop_compute_crop_anchor,
    _compute_resized_output_size,
)

from retain.data.transforms import build_transform

__all__ = ["DeviceImages", "NativeCrop", "NativeTransform", "ResizeSpec", "build_native_transform", "collate_native"]

_PIXEL_STEPS = (v2.Pad, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.Resize, v2.CenterCrop)


@dataclass(frozen=True)
class ResizeSpec:
    """What the device does to every crop of a batch: resize to (image_size, image_size), /255, Normalize."""

    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: str  # "bilinear" or "bicubic"


@dataclass
class NativeCrop:
    """One sample at its native resolution: the crop, already flipped, at the top-left of a fixed-size canvas.

    The device resizes the crop (``size`` = (h, w) pixels of ``canvas``) to (rh, rw) and keeps the output window
    of (image_size, image_size) pixels starting at (top, left): ``target`` = (rh, rw, top, left); a random crop has
    (S, S, 0, 0).
    """

    canvas: torch.Tensor  # (3, Hc, Wc) uint8
    size: tuple[int, int]
    target: tuple[int, int, int, int]
    spec: ResizeSpec


class NativeTransform:
    """The native-resolution half of a CPU transform: uint8 (3, H, W) -> :class:`NativeCrop` (same RNG draws)."""

    def __init__(self, spec: ResizeSpec, steps: Sequence[Any]) -> None:
        self.spec = spec
        self.pad = next((t for t in steps if isinstance(t, v2.Pad)), None)
        self.rrc = next((t for t in steps if isinstance(t, v2.RandomResizedCrop)), None)
        self.flip = next((t for t in steps if isinstance(t, v2.RandomHorizontalFlip)), None)
        self.resize = next((t for t in steps if isinstance(t, v2.Resize)), None)
        self.center = any(isinstance(t, v2.CenterCrop) for t in steps)

    def __call__(self, image: torch.Tensor) -> NativeCrop:
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise TypeError(f"expected a uint8 (C, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
        s = self.spec.image_size
        if self.rrc is None:  # no augmentation: the whole image, resized (and centre-cropped) on the device
            h, w = image.shape[-2:]
            rh, rw = _compute_resized_output_size((h, w), list(self.resize.size), self.resize.max_size)
            top, left = _center_crop_compute_crop_anchor(s, s, rh, rw) if self.center else (0, 0)
            canvas = image.clone(memory_format=torch.contiguous_format)  # (3, H, W)
            return NativeCrop(canvas, (h, w), (rh, rw, top, left), self.spec)
        if self.pad is not None:
            image = self._pad(image)  # (3, H + 8, W + 8)
        make_params = getattr(self.rrc, "make_params", None) or self.rrc._get_params  # torchvision < 0.21
        p = make_params([image])  # the CPU transform's draws: area, log-ratio, (top, left)
        crop = image[:, p["top"] : p["top"] + p["height"], p["left"] : p["left"] + p["width"]]  # (3, h, w)
        if self.flip is not None and torch.rand(1) < self.flip.p:  # RandomHorizontalFlip: no flip iff rand >= p
            crop = crop.flip(-1)
        return NativeCrop(_replicate(crop, image.shape[-2:]), (p["height"], p["width"]), (s, s, 0, 0), self.spec)

    def _pad(self, image: torch.Tensor) -> torch.Tensor:
        """The CPU path's Pad; zero padding by torch's pad directly (8x less overhead than the v2 dispatch)."""
        t = self.pad
        if t.padding_mode == "constant" and t.fill == 0 and isinstance(t.padding, int):
            return torch.nn.functional.pad(image, (t.padding,) * 4)
        return t(image)

    def __repr__(self) -> str:
        steps = ", ".join(repr(t) for t in (self.pad, self.rrc, self.flip, self.resize) if t is not None)
        return f"NativeTransform([{steps}]{', CenterCrop' if self.center else ''}; device: {self.spec})"


def _replicate(crop: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``crop`` at the top-left of a ``shape`` canvas, its last row and column repeated over the rest."""
    h, w = crop.shape[-2:]
    canvas = crop.new_empty(crop.shape[0], *shape)  # (3, Hc, Wc)
    canvas[:, :h, :w] = crop
    canvas[:, h:, :w] = crop[:, h - 1 : h]
    canvas[:, :, w:] = canvas[:, :, w - 1 : w]
    return canvas


def build_native_transform(
    train: bool,
    image_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    augment: str = "none",
    rrc_scale: tuple[float, float] = (0.08, 1.0),
    resize: str = "direct",
    interpolation: str = "bilinear",
) -> NativeTransform:
    """The native-resolution form of ``build_transform`` with the same arguments (see there for their meaning).

    The returned callable maps a uint8 (3, H, W) image to a :class:`NativeCrop`; batches of them
    (:func:`collate_native`) become the CPU transform's float32 (B, 3, S, S) output on ``.to(device)``. It is built
    from the CPU transform's own steps (its Pad, RandomResizedCrop and flip objects run the draws).

    Raises:
        ValueError: ``train`` with ``augment="crop_flip"`` or ``"resize_pad_rrc"`` (not decomposable), or an invalid
            argument.
    """
    if train and augment in ("crop_flip", "resize_pad_rrc"):
        raise ValueError(
            f"augment {augment!r} is not supported on the device-resize path: its crop (and padding) runs after "
            f"the resize, at the output resolution ({image_size} px), so its offsets and zero border are fractions "
            "of a native pixel, not a crop of the native image; use the CPU transform (or augment 'rrc'/'pad_rrc')"
        )
    steps = build_transform(train, image_size, mean, std, augment, rrc_scale, resize, interpolation).transforms
    for t in steps:
        if not isinstance(t, (*_PIXEL_STEPS, v2.ToDtype, v2.Normalize)):
            raise ValueError(f"build_transform step {t!r} has no native-resolution form")
        if isinstance(t, (v2.Resize, v2.RandomResizedCrop)) and t.antialias is not True:
            raise ValueError(f"{t!r}: the device resample reproduces antialias=True only")
    spec = ResizeSpec(image_size, None if mean is None else tuple(map(float, mean)),
                      None if std is None else tuple(map(float, std)), interpolation)  # fmt: skip
    return NativeTransform(spec, steps)


class DeviceImages:
    """A batch of :class:`NativeCrop`: uint8 canvases on the host; ``.to(device)`` gives the final float32 images.

    Duck-types what the training loop does with an image batch before the forward: ``len``, ``.shape``,
    ``.pin_memory()`` (DataLoader ``pin_memory=True``) and ``.to(device, non_blocking)``.
    """

    def __init__(self, canvases: torch.Tensor, sizes: torch.Tensor, targets: torch.Tensor, spec: ResizeSpec) -> None:
        self.canvases = canvases  # (B, 3, Hc, Wc) uint8
        self.sizes = sizes  # (B, 2) int64: crop (h, w)
        self.targets = targets  # (B, 4) int64: (rh, rw, top, left)
        self.spec = spec

    @classmethod
    def from_crops(cls, crops: Sequence[NativeCrop]) -> DeviceImages:
        """Stack ``crops`` (canvases of different sizes are zero-padded to the largest: outside every crop)."""
        spec = crops[0].spec
        if any(c.spec != spec for c in crops):
            raise ValueError("a batch mixes NativeCrops of different resize specs")
        shapes = {tuple(c.canvas.shape) for c in crops}
        if len(shapes) == 1:
            canvases = torch.stack([c.canvas for c in crops])  # (B, 3, Hc, Wc)
        else:
            ch, hc, wc = (max(s[i] for s in shapes) for i in range(3))
            canvases = torch.zeros(len(crops), ch, hc, wc, dtype=torch.uint8)  # (B, 3, Hc, Wc)
            for i, c in enumerate(crops):
                canvases[i, :, : c.canvas.shape[1], : c.canvas.shape[2]] = c.canvas
        sizes = torch.tensor([c.size for c in crops], dtype=torch.int64)  # (B, 2)
        targets = torch.tensor([c.target for c in crops], dtype=torch.int64)  # (B, 4)
        return cls(canvases, sizes, targets, spec)

    def __len__(self) -> int:
        return self.canvases.shape[0]

    @property
    def shape(self) -> torch.Size:
        """The shape ``.to`` returns: (B, C, S, S)."""
        s = self.spec.image_size
        return torch.Size((len(self), self.canvases.shape[1], s, s))

    @property
    def nbytes(self) -> int:
        """Bytes that cross to the device: canvases, sizes and targets."""
        return sum(t.numel() * t.element_size() for t in (self.canvases, self.sizes, self.targets))

    def pin_memory(self) -> DeviceImages:
        """A copy with page-locked tensors (the DataLoader's pin-memory thread calls this)."""
        pinned = (t.pin_memory() for t in (self.canvases, self.sizes, self.targets))
        return DeviceImages(*pinned, self.spec)

    def to(self, device: torch.device | str | None = None, non_blocking: bool = False) -> torch.Tensor:
        """The images on ``device`` as the CPU transform makes them: (B, C, S, S) float32, scaled, normalised."""
        device = self.canvases.device if device is None else torch.device(device)
        canvases, sizes, targets = (t.to(device, non_blocking=non_blocking)
                                    for t in (self.canvases, self.sizes, self.targets))  # fmt: skip
        with _ieee_matmul():
            x = _resample(canvases.float(), sizes, targets, self.spec)  # (B, C, S, S) in [0, 255]
        x = x.mul_(1.0 / 255.0)
        if self.spec.mean is not None:
            mean = torch.tensor(self.spec.mean, device=device).view(-1, 1, 1)  # (C, 1, 1)
            std = torch.tensor(self.spec.std, device=device).view(-1, 1, 1)  # (C, 1, 1)
            x = x.sub_(mean).div_(std)
        return x

    def __repr__(self) -> str:
        canvas = tuple(self.canvases.shape[1:])
        return f"DeviceImages({len(self)} x {canvas} uint8 -> {tuple(self.shape)}, {self.spec})"


def collate_native(samples: list) -> Any:
    """DataLoader ``collate_fn``: ``[(NativeCrop, label), ...]`` -> ``(DeviceImages, labels)``; anything else goes
    to ``torch.utils.data.default_collate``."""
    first = samples[0]
    if isinstance(first, NativeCrop):
        return DeviceImages.from_crops(samples)
    if isinstance(first, (tuple, list)) and first and isinstance(first[0], NativeCrop):
        rest = [default_collate([s[i] for s in samples]) for i in range(1, len(first))]
        return (DeviceImages.from_crops([s[0] for s in samples]), *rest)
    return default_collate(samples)


def _kernel(x: torch.Tensor, cubic: bool) -> torch.Tensor:
    """PyTorch's antialias filters: triangle (bilinear) or Keys cubic with a = -0.5 (bicubic)."""
    x = x.abs()
    if not cubic:
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _axis_weights(n: torch.Tensor, length: torch.Tensor, offset: torch.Tensor, out: int, canvas: int,
                  cubic: bool) -> torch.Tensor:  # fmt: skip
    """(B, out, canvas) weights of one axis: output pixel o is pixel ``offset + o`` of the crop's ``n`` pixels
    resized to ``length`` (``_compute_indices_weights_aa`` of PyTorch's separable antialiased upsampling)."""
    dtype = torch.float32 if n.device.type == "mps" else torch.float64
    n, length, offset = (t.to(dtype).view(-1, 1, 1) for t in (n, length, offset))  # (B, 1, 1)
    scale = n / length  # (B, 1, 1)
    support = (2.0 if cubic else 1.0) * scale.clamp(min=1.0)  # (B, 1, 1)
    o = torch.arange(out, device=n.device, dtype=dtype).view(1, -1, 1)  # (1, out, 1)
    center = scale * (o + offset + 0.5)  # (B, out, 1)
    j = torch.arange(canvas, device=n.device, dtype=dtype).view(1, 1, -1)  # (1, 1, canvas)
    window = (j >= (center - support + 0.5).floor()) & (j < (center + support + 0.5).floor()) & (j < n)
    w = _kernel((j - center + 0.5) / scale.clamp(min=1.0), cubic) * window  # (B, out, canvas)
    return (w / w.sum(-1, keepdim=True)).float()


def _resample(x: torch.Tensor, sizes: torch.Tensor, targets: torch.Tensor, spec: ResizeSpec) -> torch.Tensor:
    """Every crop of ``x`` (B, C, Hc, Wc) float in [0, 255] resized to (B, C, S, S): two batched matmuls."""
    s, cubic = spec.image_size, spec.interpolation == "bicubic"
    wy = _axis_weights(sizes[:, 0], targets[:, 0], targets[:, 2], s, x.shape[-2], cubic)  # (B, S, Hc)
    wx = _axis_weights(sizes[:, 1], targets[:, 1], targets[:, 3], s, x.shape[-1], cubic)  # (B, S, Wc)
    rows = (x @ wx.transpose(1, 2).unsqueeze(1)).clamp_(0.0, 255.0)  # (B, C, Hc, S): saturated like uint8
    return (wy.unsqueeze(1) @ rows).clamp_(0.0, 255.0)  # (B, C, S, S)


@contextlib.contextmanager
def _ieee_matmul() -> Iterator[None]:
    """Full float32 matmuls for the resample even where the session allows TF32 or bf16 ones (~1e-3 relative)."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
