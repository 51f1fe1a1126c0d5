"""Per-process GPU state on a CPU machine, with torch.cuda mocked: the CUDA RNG state of mid-task checkpoints (this
process's device only; an older checkpoint's per-GPU list still reads) and ``train.tf32`` (applied on a CUDA device,
untouched on CPU, recorded in metrics.json)."""

import json
import random

import numpy as np
import pytest
import torch

from retain.config import ConfigError, load_config
from retain.engine import build, loop
from retain.engine.build import precision_used, tf32_mode
from retain.engine.checkpoint import pack, unpack
from retain.engine.stages import rng_state, set_rng_state


class FakeCuda:
    """``n`` GPUs, each with its own 16-byte generator state; ``current`` is ``torch.cuda.current_device()``. Like
    torch, naming a device that is not there raises."""

    def __init__(self, n: int, current: int = 0) -> None:
        self.states = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(n)]
        self.current = current

    def _index(self, device) -> int:
        index = self.current if device in ("cuda", None) else torch.device("cuda", device).index
        if index >= len(self.states):
            raise RuntimeError(f"Invalid device index {index}: {len(self.states)} GPU(s)")
        return index

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()

    def install(self, monkeypatch) -> "FakeCuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        return self


def _through_checkpoint(state: dict) -> dict:
    """``state`` written and read as a mid-task checkpoint stores it (JSON manifest + named tensors)."""
    tensors = {}
    text = json.dumps(pack(state, "loop/rng", tensors))
    return unpack(json.loads(text), tensors)


# ---------------------------------------------------------------------------------------------------- CUDA RNG


def test_rng_state_holds_this_process_device_only_and_round_trips(monkeypatch):
    gpus = FakeCuda(4, current=3).install(monkeypatch)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = _through_checkpoint(rng_state())
    assert torch.equal(state["cuda"], torch.full((16,), 13, dtype=torch.uint8))  # device 3's, not a list of 4
    draws = random.random(), np.random.rand(), torch.rand(1).item()
    gpus.states[3] = torch.zeros(16, dtype=torch.uint8)  # the device drew meanwhile
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    assert [s[0].item() for s in gpus.states] == [10, 11, 12, 13]  # back on device 3; the others untouched
    assert torch.equal(rng_state(torch.device("cuda", 1))["cuda"], gpus.states[1])  # the run's device wins


def test_a_state_saved_with_more_gpus_restores_on_fewer(monkeypatch):
    FakeCuda(8, current=5).install(monkeypatch)
    state = _through_checkpoint(rng_state())
    monkeypatch.undo()
    one = FakeCuda(1).install(monkeypatch)
    set_rng_state(state)  # get/set_rng_state_all would name devices 1..7 here and raise
    assert one.states[0][0].item() == 15
    one.states[0] = torch.zeros(16, dtype=torch.uint8)
    set_rng_state(state, torch.device("cuda", 0))
    assert one.states[0][0].item() == 15


def test_an_older_checkpoint_with_one_state_per_gpu_still_reads(monkeypatch):
    per_gpu = [torch.full((16,), 20 + i, dtype=torch.uint8) for i in range(4)]  # get_rng_state_all() on 4 GPUs
    saved = _through_checkpoint(rng_state() | {"cuda": per_gpu})
    two = FakeCuda(2, current=1).install(monkeypatch)
    set_rng_state(saved)  # this device's entry
    assert [s[0].item() for s in two.states] == [10, 21]
    few = _through_checkpoint(rng_state() | {"cuda": [torch.full((16,), 30, dtype=torch.uint8)]})
    set_rng_state(few)  # saved with 1 GPU: device 1 has no entry; skipped, CPU states restored
    assert [s[0].item() for s in two.states] == [10, 21]
    assert torch.equal(torch.get_rng_state(), few["torch"])


def test_without_cuda_the_state_has_no_cuda_entry_and_a_saved_one_is_ignored():
    assert not torch.cuda.is_available() and "cuda" not in rng_state()
    set_rng_state(rng_state() | {"cuda": torch.zeros(16, dtype=torch.uint8)})  # saved on a GPU, resumed on CPU


# ---------------------------------------------------------------------------------------------------- TF32


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def known_flags():
    """TF32 flags set to (False, True), torch's defaults, and put back after the test."""
    before = _flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_config_parses():
    assert load_config(None, []).train.tf32 is True
    assert load_config(None, ["train.tf32=false"]).train.tf32 is False
    with pytest.raises(ConfigError, match="train.tf32"):
        load_config(None, ["train.tf32=fast"])


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_is_applied_on_cuda_and_restored(known_flags, enabled):
    with tf32_mode(enabled, torch.device("cuda", 0)):
        assert _flags() == (enabled, enabled)
        assert precision_used(load_config(None, []).train, torch.device("cuda", 0)) == {
            "device": "cuda", "autocast": "bfloat16", "tf32_matmul": enabled, "tf32_cudnn": enabled}  # fmt: skip
    assert _flags() == (False, True)


@pytest.mark.parametrize("device", ["cpu", "auto", torch.device("cpu")])
def test_tf32_is_untouched_on_cpu(known_flags, device):
    matmul_precision = torch.get_float32_matmul_precision()
    for enabled in (True, False):
        with tf32_mode(enabled, device):
            assert _flags() == (False, True) and torch.get_float32_matmul_precision() == matmul_precision
    assert precision_used(load_config(None, []).train, torch.device("cpu")) == {
        "device": "cpu", "autocast": None, "tf32_matmul": False, "tf32_cudnn": False}  # fmt: skip


@pytest.mark.parametrize("value", ["true", "false"])
def test_a_run_on_cuda_applies_train_tf32_for_its_duration(known_flags, monkeypatch, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []

    def fake_run(cfg, resume, log):
        assert build.resolve_device(cfg.train.device).type == "cuda"
        seen.append(_flags())
        return {}, None

    monkeypatch.setattr(loop, "_run", fake_run)
    loop.train(load_config(None, ["train.device=cuda", f"train.tf32={value}"]))
    assert seen == [(value == "true",) * 2] and _flags() == (False, True)


def test_a_cpu_run_records_its_precision_and_leaves_the_flags(known_flags, tiny, tmp_path):
    record = loop.run(load_config(None, tiny(name="p", **{"train.tf32": "true"})), log=lambda *_: 0)
    want = {"device": "cpu", "autocast": None, "tf32_matmul": False, "tf32_cudnn": False}
    assert record["precision"] == want
    assert json.loads((tmp_path / "runs" / "p" / "metrics.json").read_text())["precision"] == want
    assert _flags() == (False, True)
