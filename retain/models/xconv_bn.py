"""Cross-convolution BatchNorm (Xconv BN) of ConFiT (Jie, Deng, Li, CVPR Workshops 2022, arXiv 2204.10535).

Fine-tuning on a new task changes the convolutions, so the BN running means kept for an old task no longer match
what the current convs produce on that task's data. Xconv BN keeps, per task, an EMA of every conv's *input*
channel means (one per pixel phase for strided convs) and, before an old task is evaluated, sets the BN that the
conv feeds to ``mean_{h,w} conv_current(M)``, where ``M`` is a constant (phase-tiled) map of the old task's input
means. The running variance is not corrected.

- ``recover_mean(conv, input_mean, size)``: that recomputation for one conv.
- ``conv_bn_pairs(model)``: every (Conv2d, BatchNorm2d it feeds) pair of a ResNet-style model (a BN converted to
  ``SyncBatchNorm`` counts as one: ``is_batchnorm2d``).
- ``InputMeanTracker``: the EMA of one conv's input means, in registered buffers, updated by a forward pre-hook
  in train mode only; in a process group it folds in the global batch's means (an all-reduce in the hook).
- ``XconvBN``: the trackers plus per-task snapshots of every BN (weight, bias, running mean, running variance)
  and of the tracked means, all buffers, so they follow ``.to(device)`` and are saved in checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retain import distributed

__all__ = ["recover_mean", "phase_map", "is_batchnorm2d", "conv_bn_pairs", "InputMeanTracker", "XconvBN"]


def phase_map(input_mean: torch.Tensor, size: tuple[int, int], period: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """A (1, C, H, W) map holding ``input_mean`` everywhere, tiled by pixel phase when it has several rows.

    Args:
        input_mean: (C,) or (1, C) for one mean per channel; (P, C) with ``P = period[0] * period[1]`` for one
            mean per phase, rows in row-major phase order: for period (2, 2) (even row, even col), (even, odd),
            (odd, even), (odd, odd).
        size: the map's (H, W).
        period: the phase period (the conv's stride) when ``input_mean`` has several rows.
    """
    mean = input_mean.reshape(-1, input_mean.shape[-1])  # (P, C)
    n_phases, channels = mean.shape
    ph, pw = (1, 1) if n_phases == 1 else period
    if n_phases != ph * pw:
        raise ValueError(f"input_mean has {n_phases} phase rows; a period of {(ph, pw)} needs {ph * pw} (or 1)")
    height, width = size
    tile = mean.t().reshape(1, channels, ph, pw)  # (1, C, ph, pw): tile[0, c, r, s] = mean[r * pw + s, c]
    reps = (-(-height // ph), -(-width // pw))
    return tile.repeat(1, 1, *reps)[:, :, :height, :width]  # (1, C, H, W)


@torch.no_grad()
def recover_mean(conv: nn.Conv2d, input_mean: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The (C_out,) mean of ``conv``'s output over an input whose channel means are ``input_mean`` (Xconv BN).

    The conv is applied with its real stride, padding (zeros), dilation and groups to a constant map of
    ``input_mean`` of spatial size ``size``, and its output is averaged over positions, so border effects count.
    Without padding this is ``sum_{c,kh,kw} W[o, c, kh, kw] * mu[c]`` (+ bias).

    Args:
        conv: the current convolution.
        input_mean: (C,) per-channel input mean, or (4, C) per-phase means for a stride-2 conv, phases ordered
            (even row, even col), (even, odd), (odd, even), (odd, odd); in general (sh * sw, C) for stride (sh, sw).
        size: the conv input's (H, W).
    """
    if conv.padding_mode != "zeros":
        raise ValueError(f"recover_mean needs zero padding; this conv pads with {conv.padding_mode!r}")
    weight = conv.weight.float()
    bias = conv.bias.float() if conv.bias is not None else None
    grid = phase_map(input_mean.to(weight), size, tuple(conv.stride))  # (1, C, H, W)
    with torch.autocast(weight.device.type, enabled=False):
        out = F.conv2d(grid, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)  # (1, O, H', W')
    return out.mean(dim=(0, 2, 3))  # (O,)


def is_batchnorm2d(module: nn.Module) -> bool:
    """A BatchNorm2d, also once converted to ``nn.SyncBatchNorm`` (which is not a BatchNorm2d subclass)."""
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for every BatchNorm2d registered right after a Conv2d with as many output channels.

    In ResNets (timm and the CIFAR ResNets) registration order follows the data flow within a block: conv1 -> bn1,
    conv2 -> bn2, downsample.0 -> downsample.1; ResNet-18 has 20 pairs, the CIFAR ResNet-20 19 (its option-A
    shortcut has no conv). A BN not preceded by such a conv is left out.
    """
    pairs = []
    for parent_name, parent in model.named_modules():
        previous: tuple[str, nn.Module] | None = None
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if is_batchnorm2d(child) and previous is not None:
                conv = previous[1]
                if isinstance(conv, nn.Conv2d) and conv.out_channels == child.num_features:
                    pairs.append((previous[0], full))
            previous = (full, child)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(pairs, key=lambda p: order[p[0]])


class InputMeanTracker(nn.Module):
    """EMA (like a BN's running mean, zero-initialised) of a conv's per-channel input mean, per stride phase.

    Buffers: ``mean`` (P, C) with P = stride_h * stride_w phases (P = 1 for stride 1), ``size`` the input (H, W)
    last seen, and ``saved`` (T, P, C) the per-task snapshots. Attach with
    ``conv.register_forward_pre_hook(tracker.hook)``; it updates only while the conv is in train mode. In a process
    group (``retain.distributed``) each update is a collective: every process must run its train-mode forwards in
    lockstep (DDP steps do), and all of them then hold the EMA of the global batches' means.
    """

    def __init__(
        self, channels: int, stride: tuple[int, int] = (1, 1), n_tasks: int = 1, momentum: float = 0.1
    ) -> None:
        super().__init__()
        self.period = (int(stride[0]), int(stride[1]))
        self.momentum = momentum
        n_phases = self.period[0] * self.period[1]
        self.register_buffer("mean", torch.zeros(n_phases, channels))  # (P, C)
        self.register_buffer("size", torch.zeros(2, dtype=torch.long))  # (H, W) of the input
        self.register_buffer("saved", torch.zeros(n_tasks, n_phases, channels))  # (T, P, C)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch (B, C, H, W) into the EMA; in a process group, the mean of every process's slice."""
        sh, sw = self.period
        phases = [x.detach()[:, :, r::sh, s::sw] for r in range(sh) for s in range(sw)]
        if distributed.active():
            batch = _global_mean(phases)
        else:
            batch = torch.stack([p.mean(dim=(0, 2, 3), dtype=torch.float32) for p in phases])  # (P, C)
        self.mean.lerp_(batch, self.momentum)
        self.size[0], self.size[1] = x.shape[-2], x.shape[-1]

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Forward pre-hook for the tracked conv."""
        if module.training:
            self.update(args[0])


def _global_mean(phases: list[torch.Tensor]) -> torch.Tensor:
    """(P, C) channel means of each phase (B_r, C, h, w) over the global batch: one all-reduce of every process's
    per-sample means summed and its sample count B_r, so slices of different sizes weigh by their samples (the
    spatial size is the same on every process)."""
    sums = torch.stack([p.mean(dim=(2, 3), dtype=torch.float32).sum(0) for p in phases])  # (P, C)
    count = sums.new_full((len(phases), 1), float(phases[0].shape[0]))  # (P, 1)
    both = distributed.all_reduce_sum(torch.cat([sums, count], dim=1))  # (P, C + 1)
    return both[:, :-1] / both[:, -1:]


class _BNSnapshots(nn.Module):
    """Per-task (weight, bias, running_mean, running_var) of one BatchNorm2d or SyncBatchNorm: ``saved`` (T, 4, C)."""

    def __init__(self, channels: int, n_tasks: int) -> None:
        super().__init__()
        self.register_buffer("saved", torch.zeros(n_tasks, 4, channels))  # (T, 4, C)


_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")  # the rows of a BN snapshot, in order


def _key(name: str) -> str:
    return name.replace(".", "_")


class XconvBN(nn.Module):
    """Input-mean trackers on every conv that feeds a BN, and per-task snapshots of every BN and tracker.

    The module stores only buffers; it never runs a forward pass. Methods take the backbone it was built for
    (module names are resolved in it), so it can live next to the backbone (``model.xbn``) without duplicating
    parameters. ``snapshot(backbone, t)`` after task t; ``restore(backbone, t, recover=True)`` before
    evaluating an old task t.
    """

    def __init__(self, backbone: nn.Module, n_tasks: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.pairs = conv_bn_pairs(backbone)
        self.bn_names = [n for n, m in backbone.named_modules() if is_batchnorm2d(m)]
        self.trackers = nn.ModuleDict()
        self.bns = nn.ModuleDict()
        for name in self.bn_names:
            bn = backbone.get_submodule(name)
            if not (bn.affine and bn.track_running_stats):
                raise ValueError(f"Xconv BN needs affine BNs with running stats; {name} has neither or one")
            self.bns[_key(name)] = _BNSnapshots(bn.num_features, n_tasks)
        for conv_name, _ in self.pairs:
            conv = backbone.get_submodule(conv_name)
            tracker = InputMeanTracker(conv.in_channels, conv.stride, n_tasks, momentum)
            self.trackers[_key(conv_name)] = tracker
            conv.register_forward_pre_hook(tracker.hook)
        if len(self.trackers) != len(self.pairs) or len(self.bns) != len(self.bn_names):
            raise ValueError("module names collide once '.' becomes '_'; rename the backbone's modules")
        self.register_buffer("stored", torch.zeros(n_tasks, dtype=torch.bool))  # (T,) which tasks have a snapshot
        ref = next(backbone.parameters(), None)
        if ref is not None:
            self.to(ref.device)

    @property
    def values_per_task(self) -> int:
        """Numbers kept per task: 4 per BN channel plus the tracked input means (ResNet-18: 19,200 + 6,540)."""
        return sum(v.numel() for v in self.task_state(0).values())

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s snapshot rows by buffer name (relative to this module): every BN's (weight, bias,
        running mean, running variance) and every tracked input mean."""
        return {f"{kind}.{key}.saved": m.saved[task] for kind in ("bns", "trackers")
                for key, m in getattr(self, kind).items()}  # fmt: skip

    def restored_state(self, task: int, backbone: str = "backbone.", own: str = "xbn.") -> dict[str, torch.Tensor]:
        """What ``restore(task, recover=False)`` writes, by name in the model that holds the backbone under prefix
        ``backbone`` and this module under ``own``: each BN's weight, bias, running mean and variance, and each
        tracker's input mean."""
        out = {}
        for name in self.bn_names:
            for field, value in zip(_BN_FIELDS, self.bns[_key(name)].saved[task], strict=True):
                out[f"{backbone}{name}.{field}"] = value
        return out | {f"{own}trackers.{key}.mean": t.saved[task] for key, t in self.trackers.items()}

    @torch.no_grad()
    def snapshot(self, backbone: nn.Module, task: int) -> None:
        """Store every BN's (weight, bias, running_mean, running_var) and every tracked input mean as task ``task``."""
        for name in self.bn_names:
            bn = backbone.get_submodule(name)
            self.bns[_key(name)].saved[task] = torch.stack([getattr(bn, f) for f in _BN_FIELDS])
        for tracker in self.trackers.values():
            tracker.saved[task] = tracker.mean
        self.stored[task] = True

    @torch.no_grad()
    def restore(self, backbone: nn.Module, task: int, recover: bool = True) -> None:
        """Load task ``task``'s BN state and input means; ``recover``: recompute BN means via the current convs."""
        if not bool(self.stored[task]):
            raise RuntimeError(
                f"Xconv BN has no snapshot of task {task}; snapshot(backbone, {task}) after training it"
            )
        for name in self.bn_names:
            bn = backbone.get_submodule(name)
            for field, value in zip(_BN_FIELDS, self.bns[_key(name)].saved[task], strict=True):  # (C,) each
                getattr(bn, field).copy_(value)
        for tracker in self.trackers.values():
            tracker.mean.copy_(tracker.saved[task])
        if recover:
            self.recover(backbone)

    @torch.no_grad()
    def recover(self, backbone: nn.Module) -> None:
        """Set each paired BN's running mean to ``recover_mean`` of its conv and the tracked input means."""
        for conv_name, bn_name in self.pairs:
            tracker = self.trackers[_key(conv_name)]
            size = (int(tracker.size[0]), int(tracker.size[1]))
            if min(size) <= 0:
                raise RuntimeError(f"the input tracker of {conv_name} has seen no training batch yet")
            mean = recover_mean(backbone.get_submodule(conv_name), tracker.mean, size)  # (C_out,)
            backbone.get_submodule(bn_name).running_mean.copy_(mean)
