"""Multi-process runs (``retain.distributed``): real processes started by ``torchrun`` (gloo, CPU, one thread each)
against the one-process run of the same config, and a two-process run killed then resumed.

Tolerance, 2 vs 1 process (``_assert_close``). Finetune, LwF, LN tuning, EWC, SimpleCIL, PAD, LoRA, Block Expansion,
joint, linear probe, L2P, DualPrompt, CODA-Prompt (every method but ConFiT): the global batch is the
one-process batch (same seeded permutation, each process a contiguous slice; the last batch of 3 splits 1 / 2 and
the shares are weighted), DDP averages the slices' mean gradients, which is the one-process gradient up to float
summation order, and the extra passes (keys, Fisher, prototypes) are sums or gathers over the same batches. So the
weights (and EWC's Fisher) must agree to 1e-6 absolute + relative (measured: <= 3e-7 relative) and the accuracy
matrix to one test image per entry (a last-bit difference may flip a near-tie argmax; measured: equal). The ViT has
no qkv bias here: the key part of that bias has a zero gradient (softmax ignores a shift), and Adam turns its float
noise into lr-sized steps (measured 5e-5 apart), which says nothing about the distribution.

ConFiT: on gloo BatchNorm is not synchronised (torch's SyncBatchNorm needs CUDA; on NCCL ConFiT converts to it, see
``tests/test_confit_sync.py``, and here rank 0 says so in one warning): each process normalises its half batch with its
own statistics, so this is other maths, not rounding: weights within 1e-2 (measured 5.2e-3; the BN running
statistics, rank 0's, are further apart and not compared) and accuracies within two test images per entry (measured:
equal matrices). The Xconv input trackers are all-reduced (global batch means): the stem's, whose input is the
images, equals the one-process one to 1e-6; the later ones see the per-process BN's activations and are not compared.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from retain.config import ConfigError, TrainConfig, load_config
from retain.distributed import batch_plan, shard_bounds
from retain.engine import build, run
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
    "l2p",  # the batch-wise vote counted over the global batch
    "dualprompt",
    "coda_prompt",
]  # attention hooks, peft, cached tokens/features, prompt seams
METHODS = [*EXACT, "confit"]
WEIGHT_TOL = {"exact": 1e-6, "confit": 1e-2}  # absolute and relative, saved tensors but BN statistics (docstring)
CONFIT_STEM = ("xbn.trackers.conv1.mean", "xbn.trackers.conv1.saved")  # input = the images: global means, 1e-6
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
from retain.data import UnreadableImageError, datasets

spec = json.loads(sys.argv[1])
opened = []  # the image files this process opened to check them (data.bad_images)
real_probe = datasets._probe
datasets._probe = lambda path, decode: (opened.append(path), real_probe(path, decode))[1]
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
        except UnreadableImageError as e:
            os.write(1, f"rank {distributed.rank()} error: {e}\\n".encode())  # one write: lines do not mix
            sys.exit(2)
    with open(f"opened_{distributed.rank()}.json", "w") as f:
        json.dump(opened, f)
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


def _torchrun(args: list[str], cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _launch(tmp_path: Path, runs: list[list[str]], timeout: float = 300, **spec) -> subprocess.CompletedProcess:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [str(worker), json.dumps({"runs": runs, **spec})]
    return _torchrun(args, tmp_path, check=not spec and timeout == 300, timeout=timeout)


def _image_folder(root: Path) -> tuple[Path, Path]:
    """4 class folders of 6 tiny JPEGs, one of which is text; (root, the unreadable file)."""
    for c in "abcd":
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (i * 40, ord(c), 0)).save(root / c / f"{i}.jpg")
    (root / "b" / "2.jpg").write_text("this is text, not an image")
    return root, root / "b" / "2.jpg"


def _folder_overrides(tmp_path: Path, root: Path, **extra: str) -> list[str]:
    """Fine-tuning on ``root`` (20 train files, 10 per task, then 9 after the skip): global batches of 6 leave no
    last batch of 1, which 2 processes would drop."""
    return _overrides(tmp_path, "finetune", **{"data.name": "imagefolder", "data.root": str(root),
                                               "data.options": "{}", "train.batch_size": "6", **extra})  # fmt: skip


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
    folder, _ = _image_folder(tmp / "images")
    skipped = _folder_overrides(tmp, folder, **{"data.bad_images": "skip"})
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\)"):
        run(load_config(None, [*skipped, "name=folder_1"]), log=lambda *_: None)
    runs = [_overrides(tmp, m, name=f"{m}_2") for m in METHODS]
    proc = _launch(tmp, [*runs, [*augmented, "name=augmented_2", "train.num_workers=2"], [*skipped, "name=folder_2"]])
    (tmp / "launch.err").write_text(proc.stderr)
    return tmp


def test_two_processes_match_one(runs):
    """Every method but ConFiT: the one-process result to float summation order; ConFiT: close (its BN sees half
    batches on gloo), its stem input tracker equal."""
    for m in EXACT:
        _assert_close(runs, m, images=1, tol=WEIGHT_TOL["exact"])
    _assert_close(runs, "confit", images=2, tol=WEIGHT_TOL["confit"])
    wa, wb = _weights(runs, "confit_1"), _weights(runs, "confit_2")
    for k in CONFIT_STEM:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7, msg=k)
    assert (runs / "launch.err").read_text().count("torch's SyncBatchNorm needs CUDA") == 1  # rank 0, once
    _assert_close(runs, "augmented", images=1, tol=WEIGHT_TOL["exact"])  # 2 processes x 2 workers, crop + flip
    _assert_close(runs, "folder", images=1, tol=WEIGHT_TOL["exact"])  # image files, one unreadable and skipped
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
    """torchrun forwards Ctrl-C to every process, but a signal may reach one first: the stop is agreed at the loop's
    sync steps (one all-reduce every train.sync_every steps), so both processes stop after the same step instead of
    one waiting in a collective; the resumed run ends as the uninterrupted one."""
    over = _overrides(runs, "finetune") + ["train.sync_every=4"]
    cut = _launch(runs, [over + ["name=sigint"]], sigint_rank1_at_step=5)
    assert cut.returncode != 0
    lines = [ln for ln in cut.stdout.splitlines() if "interrupted: stopped at" in ln]
    assert len(lines) == 2 and lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1], cut.stdout
    manifest = json.loads((runs / "runs" / "sigint" / "checkpoints" / "midtask.json").read_text())
    assert manifest["step"] == 8  # seen by rank 1 after step 5, agreed at the next sync step
    base = runs / "base.yaml"
    base.write_text("name: base\n")
    _torchrun(["-m", "retain", "run", str(base), *over, "name=sigint", "--resume"], runs)
    full, resumed = _record(runs, "finetune_2"), _record(runs, "sigint")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    wa, wb = _weights(runs, "finetune_2"), _weights(runs, "sigint")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_one_process_checks_images_as_before(tmp_path, monkeypatch):
    """Without a process group, ``check_images_once`` is ``check_images`` itself (same call, same result)."""
    root, broken = _image_folder(tmp_path / "images")
    paths = sorted(str(p) for p in root.glob("*/*.jpg"))
    data = build.ImageDataset(torch.zeros(len(paths), dtype=torch.int64).numpy(), ["x"], paths=paths)
    calls, real = [], build.check_images
    monkeypatch.setattr(build, "check_images", lambda d, skip: calls.append(skip) or real(d, skip))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): .*b/2\.jpg$"):
        kept = build.check_images_once(data, True)
    assert kept.paths == [p for p in paths if p != str(broken)] and calls == [True]
    with pytest.raises(build.UnreadableImageError, match=f"cannot read image {broken} "):
        build.check_images_once(data, False)
    assert build._dropped(["a", "b", "b", "c"], ["a", "c"]) == [1, 2]


def test_image_files_are_checked_once_over_the_processes(runs):
    """``data.bad_images=skip`` on 2 processes: each file is opened once in all (each process checks its share),
    both processes keep the same files (``folder_2`` matches ``folder_1`` in ``test_two_processes_match_one``), and
    the warning is printed once."""
    files = sorted(str(p) for p in (runs / "images").glob("*/*.jpg"))
    opened = [json.loads((runs / f"opened_{r}.json").read_text()) for r in (0, 1)]
    assert sorted(opened[0] + opened[1]) == files and all(opened)  # train and test splits, shared out
    assert (runs / "launch.err").read_text().count("skipped 1 unreadable image file(s)") == 1


def test_an_unreadable_image_stops_every_process_with_the_same_line(tmp_path):
    """``data.bad_images=stop`` on 2 processes: whichever process finds the file, both stop naming it (none waits
    for the other in a collective)."""
    root, broken = _image_folder(tmp_path / "images")
    proc = _launch(tmp_path, [_folder_overrides(tmp_path, root, name="stopped")], timeout=120)
    assert proc.returncode != 0
    lines = sorted(ln for ln in proc.stdout.splitlines() if " error: " in ln)
    assert [ln.split(" error: ")[0] for ln in lines] == ["rank 0", "rank 1"], proc.stdout + proc.stderr[-3000:]
    msg = {ln.split(" error: ", 1)[1] for ln in lines}
    assert len(msg) == 1 and msg.pop().startswith(f"cannot read image {broken} (cannot identify image file")
