"""Loading that does not change results (``retain.engine.loading``): the batch order of the earlier loader, a seed per
sample so workers and processes do not change augmentations, a resume that reads none of the skipped samples, and
``train.num_workers: auto``."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from retain.config import ConfigError, TrainConfig, load_config
from retain.data import ImageDataset, build_transform
from retain.engine import checkpoint as ck
from retain.engine import loading, run
from retain.engine.context import RunContext
from retain.engine.loading import EpochBatches, SeededSamples, auto_workers

QUIET = {"log": lambda *_: None}


def _augmented(n: int = 24) -> ImageDataset:
    """Real-looking 16-px images behind crop + flip: every read of a sample draws a new crop."""
    images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    tf = build_transform(True, 16, None, None, augment="crop_flip")
    return ImageDataset(np.arange(n) % 3, ["a", "b", "c"], images=images, transform=tf)


@pytest.mark.parametrize("n,batch,drop_last", [(10, 3, False), (27, 8, False), (100, 32, True), (64, 32, False)])
def test_batch_order_is_the_earlier_loaders(n, batch, drop_last):
    """Three epochs from one generator: the batches ``DataLoader(shuffle=True)`` behind a progress bar gave."""
    g = torch.Generator().manual_seed(5)
    old_loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, shuffle=True, generator=g,
                            drop_last=drop_last)  # fmt: skip
    old = [[b[0].tolist() for b in tqdm(old_loader, disable=True)] for _ in range(3)]
    sampler = EpochBatches(n, batch, drop_last, torch.Generator().manual_seed(5))
    new = [[[i for i, _ in b] for b in sampler] for _ in range(3)]
    assert new == old and len(sampler) == len(old_loader)


def test_skip_starts_the_epoch_at_batch_k_with_the_same_seeds():
    full = list(EpochBatches(27, 8, False, torch.Generator().manual_seed(1)))
    sampler = EpochBatches(27, 8, False, torch.Generator().manual_seed(1))
    sampler.skip(2)
    assert list(sampler) == full[2:]
    assert list(sampler) != full  # the skip holds for one epoch; the next one is a new permutation
    seeds = [s for b in full for _, s in b]
    assert len(set(seeds)) == 27  # a seed per sample


def test_a_sample_looks_the_same_whatever_loads_it():
    """0 or 2 workers, batch 4 or 7: each sample of the epoch gets the same crop and flip; the global RNG of the
    training process is not drawn by the augmentation."""
    data = SeededSamples(_augmented())

    def epoch(workers: int, batch: int) -> dict[int, torch.Tensor]:
        sampler = EpochBatches(len(data), batch, False, torch.Generator().manual_seed(7))
        keys = [k for b in EpochBatches(len(data), batch, False, torch.Generator().manual_seed(7)) for k in b]
        loader = DataLoader(data, batch_sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        images = torch.cat([x for x, _ in loader])
        return {i: img for (i, _), img in zip(keys, images, strict=True)}

    before = torch.get_rng_state()
    a = epoch(0, 4)
    assert torch.equal(torch.get_rng_state(), before)
    b, c = epoch(2, 4), epoch(0, 7)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[i], b[i]) and torch.equal(a[i], c[i]) for i in a)
    plain = _augmented()
    assert any(not torch.equal(plain[i][0], a[i]) for i in a)  # the crops are random, not the identity


def _weights(path):
    return load_file(str(path / "checkpoints" / "task_001.safetensors"))


def test_workers_do_not_change_a_run(tiny, tmp_path):
    """An augmented run with 0 and with 2 dataloader workers: the same weights, bit for bit."""
    over = tiny(**{"data.augment": "crop_flip", "train.epochs": "2", "method.name": "ewc", "method.fisher": "facil"})
    records = {w: run(load_config(None, over + [f"name=w{w}", f"train.num_workers={w}"]), **QUIET) for w in (0, 2)}
    assert records[0]["accuracy_matrix"] == records[2]["accuracy_matrix"]
    a, b = _weights(tmp_path / "runs" / "w0"), _weights(tmp_path / "runs" / "w2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(BaseException):
    """Stands for a crash: nothing in the run catches it."""


def test_resume_reads_none_of_the_skipped_samples(tiny, tmp_path, monkeypatch):
    """Crashed after step 3 of an epoch of 6 steps and resumed: the two processes together read every training sample
    exactly as often as the uninterrupted run (the earlier resume decoded and augmented the 3 finished batches)."""
    reads = []
    real_get = SeededSamples.__getitem__
    monkeypatch.setattr(SeededSamples, "__getitem__", lambda self, key: reads.append(key[0]) or real_get(self, key))
    options = "{n_classes: 4, n_per_class: 24, n_test_per_class: 2, image_size: 16}"
    over = tiny(**{"data.augment": "crop_flip", "train.epochs": "2", "run.checkpoint_every": "1",
                   "data.options": options})  # fmt: skip
    run(load_config(None, over + ["name=full"]), **QUIET)
    full, reads[:] = len(reads), []

    real_step, seen = ck.Checkpointer.after_step, [0]

    def after_step(self, loop):
        real_step(self, loop)
        seen[0] += 1
        if seen[0] == 9:  # task 0: epoch 1 has 6 steps of 8; step 9 is batch 3 of epoch 2
            raise Crash

    monkeypatch.setattr(ck.Checkpointer, "after_step", after_step)
    with pytest.raises(Crash):
        run(load_config(None, over + ["name=cut"]), **QUIET)
    cut = len(reads)
    assert cut == 9 * 8
    monkeypatch.setattr(ck.Checkpointer, "after_step", real_step)
    reads[:] = []
    run(load_config(None, over + ["name=cut"]), resume=True, **QUIET)
    assert cut + len(reads) == full
    a, b = _weights(tmp_path / "runs" / "full"), _weights(tmp_path / "runs" / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------- num_workers


def test_auto_workers_rule(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    slow, fast = _augmented(24), _augmented(2)
    monkeypatch.setattr(loading, "load_seconds", lambda data: 60.0 if data is slow else 0.01)
    monkeypatch.setattr(loading, "cpus_available", lambda: 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_workers(slow, cuda) == 16  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_workers(slow, cuda) == 7  # 32 CPUs / 4 processes, one kept for the training process
    assert auto_workers(fast, cuda) == 0  # loads faster than workers start
    monkeypatch.setattr(loading, "cpus_available", lambda: 4)
    assert auto_workers(slow, cuda) == 0  # one CPU per process: nothing to spare
    assert auto_workers(slow, cpu) == 0
    ctx = RunContext(TrainConfig(num_workers=3), cpu)
    assert ctx.workers(fast) == 3  # a number is taken as it is


def test_load_seconds_reads_a_few_samples_and_leaves_the_rng():
    data, reads = _augmented(100), []
    real = type(data).load
    data.load = lambda i: reads.append(i) or real(data, i)
    before = torch.get_rng_state()
    assert loading.load_seconds(data) > 0
    assert reads == [0, 1, 2, 3] and torch.equal(torch.get_rng_state(), before)


def test_num_workers_values():
    assert TrainConfig().num_workers == "auto"
    assert load_config(None, ["train.num_workers=2"]).train.num_workers == 2
    with pytest.raises(ConfigError, match=r"train.num_workers='many'; use auto or a number"):
        load_config(None, ["train.num_workers=many"])
    with pytest.raises(ConfigError, match=r"train.num_workers=-1; it must be >= 0"):
        load_config(None, ["train.num_workers=-1"])


def test_device_resize_gives_the_cpu_batches_up_to_rounding(tiny, tmp_path):
    """``data.device_resize=true``: the training loader yields native crops that ``.to(device)`` resizes; with the
    same per-sample seeds they are the CPU transform's batches to 1.1/255 a pixel (uint8 rounding), and a run
    trains and evaluates on them."""
    from retain.engine.build import build_run

    over = tiny(
        **{
            "data.augment": "rrc",
            "data.normalize": "none",
            "data.image_size": "48",
            "model.kwargs": "{depth: 1, embed_dim: 32, num_heads: 2, img_size: 48}",
        }
    )  # 16-px images upsampled
    batches = {}
    for flag in ("false", "true"):
        cfg = load_config(None, [*over, f"data.device_resize={flag}"])
        scenario, _ = build_run(cfg, torch.device("cpu"))
        ctx = RunContext(cfg.train, torch.device("cpu"), seed=cfg.seed)
        loader = ctx.train_loader(scenario.tasks[0].train, 8, torch.Generator().manual_seed(3))
        batches[flag] = [x.to(torch.device("cpu")) for x, _ in loader]
    for cpu, device in zip(batches["false"], batches["true"], strict=True):
        assert cpu.shape == device.shape == (len(cpu), 3, 48, 48)
        assert (cpu - device).abs().max() <= 1.1 / 255 + 1e-6
    assert (batches["false"][0][0] - batches["true"][1][0]).abs().max() > 0.1  # a different image is far
    with pytest.raises(ConfigError, match="data.device_resize=true cannot do data.augment=crop_flip"):
        build_run(load_config(None, [*over, "data.device_resize=true", "data.augment=crop_flip"]))
    record = run(load_config(None, [*over, "data.device_resize=true", "name=dev"]), **QUIET)
    assert len(record["accuracy_matrix"]) == 2


class _SigintHandler(torch.utils.data.Dataset):
    """Each item: whether the process reading it ignores SIGINT."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import signal

        return torch.tensor(signal.getsignal(signal.SIGINT) == signal.SIG_IGN), i


def test_workers_leave_ctrl_c_to_the_training_process():
    """A terminal's Ctrl-C reaches every worker too; they ignore it (the training process saves, then stops them),
    so the run's "saving a checkpoint" line is printed once, not once per worker."""
    ctx = RunContext(TrainConfig(num_workers=2), torch.device("cpu"))
    ignored = torch.cat([x for x, _ in ctx.train_loader(_SigintHandler(), 2, torch.Generator().manual_seed(0))])
    assert ignored.all() and len(ignored) == 4


def test_auto_probes_the_data_not_its_seeded_view(monkeypatch):
    """On a GPU ``auto`` reads a few samples to time them: the training and pass loaders must probe the dataset
    itself (their ``SeededSamples`` view is keyed by (index, seed) and cannot be read by index)."""
    monkeypatch.setattr(loading, "cpus_available", lambda: 4)
    ctx = RunContext(TrainConfig(), torch.device("cuda"))  # built, never iterated: no GPU needed
    data = _augmented(8)
    assert ctx.train_loader(data, 4, torch.Generator().manual_seed(0)).num_workers == 0  # 8 images load at once
    assert ctx.pass_loader(data, 4).num_workers == 0
    assert ctx.eval_loader(data).num_workers == 0
