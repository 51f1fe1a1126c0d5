"""Multi-process runs (``retain.distributed``): real processes started by ``torchrun`` (gloo, CPU, one thread each)
against the one-process run of the same config, and a two-process run killed then resumed.

Tolerance, 2 vs 1 process (``_assert_close``). Finetune, LwF, LN tuning, EWC, SimpleCIL, PAD, LoRA, Block Expansion,
joint, linear probe (every method but ConFiT): the global batch is the
one-process batch (same seeded permutation, each process a contiguous slice; the last batch of 3 splits 1 / 2 and
the shares are weighted), DDP averages the slices' mean gradients, which is the one-process gradient up to float
summation order, and the extra passes (keys, Fisher, prototypes) are sums or gathers over the same batches. So the
weights (and EWC's Fisher) must agree to 1e-6 absolute + relative (measured: <= 3e-7 relative) and the accuracy
matrix to one test image per entry (a last-bit difference may flip a near-tie argmax; measured: equal). The ViT has
no qkv bias here: the key part of that bias has a zero gradient (softmax ignores a shift), and Adam turns its float
noise into lr-sized steps (measured 5e-5 apart), which says nothing about the distribution.

ConFiT: BatchNorm is not synchronised: each process normalises its half batch with its own statistics, so this is
other maths, not rounding: weights within 1e-2 (measured 5.2e-3; the BN running statistics, rank 0's, are further
apart and not compared) and accuracies within two test images per entry (measured: equal matrices).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retain.config import ConfigError, TrainConfig, load_config
from retain.distributed import batch_plan, shard_bounds
from retain.engine import run
from retain.engine.loading import EpochBatches

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
EXACT = [
    "finetune",
    "lwf",
    "ln_tuning",
    "ewc",
    "simplecil",  # ewc: Fisher sums reduced; simplecil: features gathered
    "pad",
    "lora",
    "block_expansion",
    "joint",
    "linear_probe",
]  # attention hooks, peft, cached tokens/features
METHODS = [*EXACT, "confit"]
WEIGHT_TOL = {"exact": 1e-6, "confit": 1e-2}  # absolute and relative, saved tensors but BN statistics (docstring)
TEST_PER_TASK = 12  # 3 classes x 4 test images: one image is 8.33 points

# 6 classes in 2 tasks of 27 training images: global batches 8, 8, 8, 3 (the last splits 1 / 2: unequal shares);
# evaluation and extra passes in batches of 5, so both processes hold part of every set
SHAPE = {
    "data.options": "{n_classes: 6, n_per_class: 9, n_test_per_class: 4, image_size: 16}",
    "train.eval_batch_size": "5",
    "train.epochs": "2",
    "train.optimizer": "adam",  # learns this toy stream in 2 epochs (SGD at 0.01 stays at chance)
    "train.lr": "3e-4",
    "train.threads": "1",
}

WORKER = """
import json, os, signal, sys
from retain import distributed
from retain.config import load_config
from retain.engine import checkpoint, run
from retain.engine.context import RunInterrupted

spec = json.loads(sys.argv[1])
# rank 1 alone gets a signal after that optimiser step: SIGKILL (it dies) or SIGINT (a Ctrl-C that reached it first)
signals = {"kill_rank1_at_step": signal.SIGKILL, "sigint_rank1_at_step": signal.SIGINT}
at = {spec[k]: sig for k, sig in signals.items() if spec.get(k)}
if at:
    real = checkpoint.Checkpointer.after_step
    def after_step(self, loop):
        real(self, loop)
        if distributed.rank() == 1 and self.ctx.step in at:
            os.kill(os.getpid(), at[self.ctx.step])
    checkpoint.Checkpointer.after_step = after_step
with distributed.session("cpu"):  # one group for every run of this launch
    for over in spec["runs"]:
        try:
            run(load_config(None, over), log=lambda *_: None)
        except RunInterrupted as e:
            print(f"rank {distributed.rank()} interrupted: {e}", flush=True)
            sys.exit(130)
"""


def _overrides(tmp_path: Path, method: str, **extra: str) -> list[str]:
    over = dict(SHAPE, **{"method.name": method}, **extra)
    over["model.kwargs"] = (
        "{depth: 1, embed_dim: 32, num_heads: 2, img_size: 16, qkv_bias: false}"  # see _assert_close
    )
    if method == "confit":  # a ResNet with BatchNorm, task-IL as in the paper
        over |= {
            "model.backbone": "cifar_resnet20.retain_cifar10",
            "model.pretrained": "true",
            "model.kwargs": "{}",
            "scenario.protocol": "task_il",
            "data.options": SHAPE["data.options"].replace("16}", "32}"),
            "data.image_size": "32",
            "train.optimizer": "sgd",
            "train.lr": "0.01",
            "train.momentum": "0",
        }
    return tiny_overrides(tmp_path, **over)


def _torchrun(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _launch(tmp_path: Path, runs: list[list[str]], **spec) -> subprocess.CompletedProcess:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    return _torchrun([str(worker), json.dumps({"runs": runs, **spec})], tmp_path, check=not spec)


def _record(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "metrics.json").read_text())


def _weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / "runs" / name / "checkpoints" / "task_001.safetensors"))


def _max_gap(a: list[list[float | None]], b: list[list[float | None]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True) if x is not None)


def _bn_state(name: str) -> bool:
    """BN running statistics and ConFiT's snapshots of them (rank 0's under DDP, see the module docstring)."""
    return name.startswith("xbn.") or name.endswith((".running_mean", ".running_var", ".num_batches_tracked"))


def _assert_close(tmp_path: Path, method: str, images: int, tol: float) -> None:
    a, b = _record(tmp_path, f"{method}_1"), _record(tmp_path, f"{method}_2")
    assert a["matrices"].keys() == b["matrices"].keys()
    for view in a["matrices"]:
        gap = _max_gap(a["matrices"][view], b["matrices"][view])
        assert gap <= images * 100 / TEST_PER_TASK + 1e-9, (method, view, a["matrices"], b["matrices"])
    wa, wb = _weights(tmp_path, f"{method}_1"), _weights(tmp_path, f"{method}_2")
    assert wa.keys() == wb.keys()
    weights = [k for k in wa if not _bn_state(k)]
    assert len(weights) > 2
    for k in weights:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=tol, atol=tol), (method, k)


# ---------------------------------------------------------------------------------------------------------- pure


def _slices(n_samples: int, processes: int, rank: int) -> EpochBatches:
    """Seeded shuffled global batches of 8, this process's slice of each (1 process: the one-process batches)."""
    return EpochBatches(n_samples, 8, False, torch.Generator().manual_seed(3), processes, rank)


def test_rank_slices_cut_the_one_process_batches_in_order():
    one = list(_slices(27, 1, 0))
    assert sorted(i for b in one for i, _ in b) == list(range(27))
    for n in (2, 3):
        slices = [list(_slices(27, n, r)) for r in range(n)]
        joined = [sum((s[i] for s in slices), []) for i in range(len(slices[0]))]  # fmt: skip
        assert joined == one  # same permutation, same batches, same augmentation seeds, every sample once
        assert [len(b) for b in slices[0]] == [8 // n] * 3 + [3 // n]  # the last batch splits unevenly
    tiny_tail = _slices(17, 2, 0)
    assert len(tiny_tail) == len(list(tiny_tail)) == 2  # a last batch of 1 sample cannot go to 2 processes: dropped


def test_shards_cover_every_item_once():
    for n_items in (0, 1, 5, 12):
        for parts in (1, 2, 3):
            bounds = [shard_bounds(n_items, parts, r) for r in range(parts)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n_items
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


def test_batch_rule_is_explicit_and_refuses_what_does_not_split():
    plan = batch_plan(TrainConfig(batch_size=64, lr=0.1), processes=4)
    assert (plan["global_batch"], plan["per_process_batch"], plan["lr"]) == (64, 16, 0.1)
    plan = batch_plan(TrainConfig(batch_size=64, lr=0.1, batch_scope="per_process", lr_scaling="linear"), 4)
    assert (plan["global_batch"], plan["per_process_batch"], plan["lr"]) == (256, 64, 0.4)
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        batch_plan(TrainConfig(batch_size=64), processes=3)
    with pytest.raises(ConfigError, match="train.batch_scope=per_process"):
        batch_plan(TrainConfig(lr_scaling="linear"), processes=2)


# ---------------------------------------------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Each method once on 1 process (in this process) and once on 2 (one torchrun launch, one start-up); and an
    augmented fine-tuning run on 1 process without workers and on 2 processes with 2 workers each."""
    tmp = tmp_path_factory.mktemp("distributed")
    for m in METHODS:
        run(load_config(None, _overrides(tmp, m, name=f"{m}_1")), log=lambda *_: None)
    augmented = _overrides(tmp, "finetune", **{"data.augment": "crop_flip"})
    run(load_config(None, [*augmented, "name=augmented_1", "train.num_workers=0"]), log=lambda *_: None)
    runs = [_overrides(tmp, m, name=f"{m}_2") for m in METHODS]
    _launch(tmp, [*runs, [*augmented, "name=augmented_2", "train.num_workers=2"]])
    return tmp


def test_two_processes_match_one(runs):
    """Every method but ConFiT: the one-process result to float summation order; ConFiT: close (its BN sees half
    batches)."""
    for m in EXACT:
        _assert_close(runs, m, images=1, tol=WEIGHT_TOL["exact"])
    _assert_close(runs, "confit", images=2, tol=WEIGHT_TOL["confit"])
    _assert_close(runs, "augmented", images=1, tol=WEIGHT_TOL["exact"])  # 2 processes x 2 workers, crop + flip
    for m in METHODS:
        plan = _record(runs, f"{m}_2")["distributed"]
        assert (plan["processes"], plan["global_batch"], plan["per_process_batch"]) == (2, 8, 4)


def test_two_process_run_killed_then_resumed_ends_as_uninterrupted(runs):
    """Rank 1 is SIGKILLed in task 2: torchrun stops the run, rank 0's checkpoint is complete, and the same
    two-process command with --resume ends with the uninterrupted run's (``finetune_2``) matrix and weights, bit
    for bit (``run.checkpoint_every`` changes when a run saves, not what it computes)."""
    over = _overrides(runs, "finetune", **{"run.checkpoint_every": "2"})
    cut = _launch(runs, [over + ["name=cut"]], kill_rank1_at_step=11)
    assert cut.returncode != 0 and "SIGKILL" in cut.stderr
    manifest = json.loads((runs / "runs" / "cut" / "checkpoints" / "midtask.json").read_text())
    assert manifest["task"] == 1 and manifest["step"] == 10  # rank 0 saved step 10 before step 11 could finish
    base = runs / "base.yaml"
    base.write_text("name: base\n")
    out = _torchrun(["-m", "retain", "run", str(base), *over, "name=cut", "--resume"], runs)
    assert out.stdout.count("average_accuracy") == 1  # rank 0 alone prints the summary
    full, resumed = _record(runs, "finetune_2"), _record(runs, "cut")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    wa, wb = _weights(runs, "finetune_2"), _weights(runs, "cut")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_ctrl_c_seen_by_one_process_stops_both_at_the_same_step(runs):
    """torchrun forwards Ctrl-C to every process, but a signal may reach one first: the stop is agreed at each step
    (one all-reduce), so both processes stop after the same step instead of one waiting in a collective; the resumed
    run ends as the uninterrupted one."""
    over = _overrides(runs, "finetune")
    cut = _launch(runs, [over + ["name=sigint"]], sigint_rank1_at_step=5)
    assert cut.returncode != 0
    lines = [ln for ln in cut.stdout.splitlines() if "interrupted: stopped at" in ln]
    assert len(lines) == 2 and lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1], cut.stdout
    manifest = json.loads((runs / "runs" / "sigint" / "checkpoints" / "midtask.json").read_text())
    assert manifest["step"] == 6  # seen by rank 1 after step 5, agreed at the next step's check
    base = runs / "base.yaml"
    base.write_text("name: base\n")
    _torchrun(["-m", "retain", "run", str(base), *over, "name=sigint", "--resume"], runs)
    full, resumed = _record(runs, "finetune_2"), _record(runs, "sigint")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    wa, wb = _weights(runs, "finetune_2"), _weights(runs, "sigint")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
