"""Block Expansion's prefix cache on several processes of one node: one shared, file-backed copy that every process
maps (not one gathered copy each), equal row for row to the gathered cache, its file gone once mapped; and the
fallbacks when shared memory has no room. Two real gloo processes on the CPU, and the space check in one."""

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from retain.config import load_config
from retain.engine import RunContext, build_run, run
from retain.methods import block_expansion
from retain.methods.block_expansion import SHM_DIR, _create_cache_file

from conftest import tiny_overrides, torchrun_worker

# 24 images of task 0 in pass batches of 5: 5 batches split 2 / 3 (10 and 14 rows), the last one short
OVER = {"method.name": "block_expansion", "data.augment": "none", "train.eval_batch_size": "5",
        "model.kwargs": "{depth: 2, embed_dim: 32, num_heads: 2, img_size: 16}"}  # fmt: skip
TRAIN = {"method.cache_prefix": "true", "scenario.protocol": "task_il", "train.epochs": "2", "train.lr": "0.05"}

WORKER = """
import json, sys, warnings
import torch
from retain import distributed
from retain.config import load_config
from retain.engine import RunContext, build_run, run
from retain.methods import block_expansion
from test_prefix_cache_shared import mapping_of

spec = json.loads(sys.argv[1])
cpu = torch.device("cpu")
with distributed.session("cpu"):
    cfg = load_config(None, spec["overrides"])
    torch.manual_seed(0)
    scenario, method = build_run(cfg, cpu)
    method.bind(RunContext(cfg.train, cpu))
    task, out = scenario.tasks[0], {}
    for dtype in ("float32", "bfloat16"):
        method.cfg.cache_dtype = dtype
        with warnings.catch_warnings(record=True) as shared_warns:
            warnings.simplefilter("always")
            tokens, labels = method.prefix_dataset(task).tensors
        free = block_expansion._free_bytes
        block_expansion._free_bytes = lambda d: 0  # no room anywhere: the gathered cache
        with warnings.catch_warnings(record=True) as gather_warns:
            warnings.simplefilter("always")
            ref_tokens, ref_labels = method.prefix_dataset(task).tensors
        block_expansion._free_bytes = free
        out[dtype] = {"equal": torch.equal(tokens, ref_tokens) and torch.equal(labels, ref_labels),
                      "dtype": str(tokens.dtype), "shape": list(tokens.shape), "mapping": mapping_of(tokens),
                      "ref_mapping": mapping_of(ref_tokens), "resizable": tokens.untyped_storage().resizable(),
                      "ref_resizable": ref_tokens.untyped_storage().resizable(),
                      "warnings": [len(shared_warns), len(gather_warns)]}
        if distributed.rank() == 0:
            torch.save((tokens.clone(), labels), f"{spec['out']}/{dtype}.pt")
    def refuse(*args):
        raise FileNotFoundError("not this process's /dev/shm")

    if distributed.rank() == 1:  # a process that cannot open rank 0's file: every process gathers
        block_expansion._SharedRows.__init__ = refuse
    with warnings.catch_warnings(record=True) as unopened_warns:
        warnings.simplefilter("always")
        tokens = method.prefix_dataset(task).tensors[0]
    out["unopened"] = {"equal": torch.equal(tokens, ref_tokens), "mapping": mapping_of(tokens),
                       "warnings": [str(w.message) for w in unopened_warns]}
    with open(f"{spec['out']}/rank{distributed.rank()}.json", "w") as f:
        json.dump(out, f)
    run(load_config(None, spec["run"]), log=lambda *_: None)  # training on the shared cache, 2 workers each
"""


def mapping_of(t: torch.Tensor) -> dict | None:
    """The file mapping holding ``t``'s data: its path and ``Anonymous`` kB in ``/proc/self/smaps`` (pages of it this
    process copied on write: its private copy; ``Private_Dirty`` would also count the file's own tmpfs pages that no
    other process maps); None when the data lies in anonymous memory (the heap, or a mapping of no file)."""
    ptr, found = t.data_ptr(), None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                lo, hi = (int(a, 16) for a in head[0].split("-"))
                path = " ".join(head[5:])
                found = {"path": path, "anonymous_kb": -1} if lo <= ptr < hi and path.startswith("/") else None
            elif found is not None and head[0] == "Anonymous:":
                found["anonymous_kb"] = int(head[1])
                return found
    return None


def _weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / "runs" / name / "checkpoints" / "task_001.safetensors"))


def test_one_node_shares_one_mapped_copy_equal_to_the_gathered_cache(tmp_path):
    overrides = tiny_overrides(tmp_path, **OVER)
    training = [*tiny_overrides(tmp_path, **OVER, **TRAIN), "name=two", "train.num_workers=2"]
    torchrun_worker(tmp_path, WORKER, {"overrides": overrides, "out": str(tmp_path), "run": training})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for dtype in ("float32", "bfloat16"):
        for r, res in enumerate(r[dtype] for r in ranks):
            assert res["equal"] and res["dtype"] == f"torch.{dtype}" and res["shape"] == [24, 17, 32]
            m = res["mapping"]  # the data lies in the deleted shared file, never copied into this process
            assert m is not None and m["path"].endswith(" (deleted)") and "retain-prefix-cache-" in m["path"]
            assert m["path"].startswith(SHM_DIR + "/") and not os.path.exists(m["path"].removesuffix(" (deleted)"))
            assert m["anonymous_kb"] == 0 and not res["resizable"]
            assert res["ref_mapping"] is None and res["ref_resizable"]  # the gathered copy: this process's heap
            assert res["warnings"] == [0, 1 if r == 0 else 0]  # the fallback says so once, on rank 0
        assert ranks[0][dtype]["mapping"]["path"] == ranks[1][dtype]["mapping"]["path"]  # one file for both
    for r, res in enumerate(r["unopened"] for r in ranks):
        assert res["equal"] and res["mapping"] is None and len(res["warnings"]) == (1 if r == 0 else 0)
        assert all("not every process could open" in w for w in res["warnings"])
    assert not list(Path(SHM_DIR).glob(f"{Path(ranks[0]['float32']['mapping']['path']).name.rsplit('-', 1)[0]}-*"))
    # and the cache a single process computes (same batches of 5)
    cpu = torch.device("cpu")
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    scenario, method = build_run(cfg, cpu)
    method.bind(RunContext(cfg.train, cpu))
    for dtype in ("float32", "bfloat16"):
        method.cfg.cache_dtype = dtype
        tokens, labels = method.prefix_dataset(scenario.tasks[0]).tensors
        two_tokens, two_labels = torch.load(tmp_path / f"{dtype}.pt")
        assert torch.equal(labels, two_labels)
        torch.testing.assert_close(two_tokens, tokens, rtol=1e-5, atol=1e-6)
    # training on it: the one-process run's weights
    run(load_config(None, [*tiny_overrides(tmp_path, **OVER, **TRAIN), "name=one", "train.num_workers=0"]),
        log=lambda *_: None)  # fmt: skip
    one, two = _weights(tmp_path, "one"), _weights(tmp_path, "two")
    assert one.keys() == two.keys() and any(k.startswith("backbone.blocks.2.") for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_no_room_in_shared_memory_falls_back_to_the_temporary_directory_then_to_gathering(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(block_expansion, "_free_bytes", lambda d: 0 if d == SHM_DIR else 2**40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = _create_cache_file(4096)
    assert Path(path).parent == tmp_path and os.path.getsize(path) == 4096 and os.stat(path).st_mode & 0o777 == 0o600
    assert [str(w.message) for w in caught] == [f"prefix cache: no room for 0.00 GB in {SHM_DIR}; the processes "
                                                f"share it through {tmp_path} instead"]  # fmt: skip
    os.unlink(path)
    monkeypatch.setattr(block_expansion, "_free_bytes", lambda d: 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _create_cache_file(4096) == ""
    assert len(caught) == 1 and "every process holds its own copy" in str(caught[0].message)
    assert not list(tmp_path.iterdir())


def test_a_file_that_cannot_be_allocated_is_removed_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(block_expansion, "SHM_DIR", str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _create_cache_file(4096) == ""
    assert (
        len(caught) == 1 and not list((tmp_path / "shm").iterdir()) and list(tmp_path.iterdir()) == [tmp_path / "shm"]
    )
