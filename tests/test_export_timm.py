"""``retain export --format timm``: a plain timm state dict whose logits are the method's, loaded without retain;
methods whose model is not one timm forward pass are refused in one line. And ``retain export`` of an artefact that
holds the whole model says "self-contained"."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from retain.cli import main
from retain.config import load_config
from retain.engine import train
from retain.export_timm import NOT_PLAIN, TIMM_FORMAT, export_timm

from conftest import CONFIT_CNN

DIFFS: dict[str, float] = {}  # exactness figures, printed with -s


def _train(tiny, method, protocol="class_il", name=None, **extra):
    """A tiny 2-task run of ``method`` in ``runs/<method>_<protocol>`` (or ``runs/<name>``); the trained method."""
    over = {"method.name": method, "scenario.protocol": protocol, "train.lr": "0.1", **extra}
    over = tiny(name=name or f"{method}_{protocol}", **over)
    _, trained = train(load_config(None, over), log=lambda *_: None)
    return trained


def _timm_model(path):
    """The model as the file's metadata says to build it: ``pretrained_cfg_overlay=dict(file=PATH)``."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    overlay = dict(file=str(path), **json.loads(meta["timm_pretrained_cfg_overlay"]))
    model = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=overlay,
                              **json.loads(meta["timm_kwargs"]))  # fmt: skip
    return meta, model.eval()


CASES = [("finetune", "class_il", None), ("linear_probe", "class_il", None), ("joint", "class_il", None),
         ("lwf", "class_il", None), ("ewc", "class_il", None), ("pad", "class_il", None), ("lora", "class_il", None),
         ("block_expansion", "class_il", None), ("finetune", "task_il", 1), ("lora", "task_il", 0),
         ("lora", "task_il", 1), ("block_expansion", "task_il", 0), ("block_expansion", "task_il", 1),
         ("lora", "finetune", None)]  # fmt: skip


@pytest.mark.parametrize(("method", "protocol", "task"), CASES)
def test_the_timm_model_computes_the_methods_logits(tiny, tmp_path, method, protocol, task):
    trained = _train(tiny, method, protocol)
    out = tmp_path / "timm.safetensors"
    meta = export_timm(tmp_path / "runs" / f"{method}_{protocol}", out, task=task)
    got, model = _timm_model(out)
    assert got == meta and meta["format"] == TIMM_FORMAT and meta["timm_model"] == "vit_tiny_patch16_224"
    kwargs = json.loads(meta["timm_kwargs"])
    depth = 2 if method == "block_expansion" else 1  # the tiny ViT's one block (+ the inserted one)
    assert kwargs == {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": depth, "num_heads": 2,
                      "mlp_ratio": 2.0, "num_classes": kwargs["num_classes"]}  # fmt: skip
    scenario = trained.scenario
    tasks = [task] if task is not None else range(len(scenario.tasks))
    lo = scenario.tasks[tasks[0]].offset
    hi = lo + sum(scenario.tasks[t].n_classes for t in tasks)
    assert kwargs["num_classes"] == hi - lo and json.loads(meta["class_names"]) == scenario.class_names[lo:hi]
    assert int(meta["label_offset"]) == lo
    assert set(model.state_dict()) == set(load_file(str(out)))  # every tensor, no other: a strict load
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    trained.model.eval()
    with torch.no_grad(), trained.deployed():
        expected = trained.predict(x, task).logits[:, lo:hi]
        logits = model(x)
    diff = (logits - expected).abs().max().item()
    DIFFS[f"{method}/{protocol}/{task}"] = diff
    print(f"{method} {protocol} task={task}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-5
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_the_file_loads_in_timm_without_retain(tiny, tmp_path):
    trained = _train(tiny, "block_expansion", "task_il")
    out = tmp_path / "be.safetensors"
    main(["export", str(tmp_path / "runs" / "block_expansion_task_il"), "-o", str(out), "--format", "timm",
          "--task", "1"])  # fmt: skip
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    trained.model.eval()
    with torch.no_grad(), trained.deployed():
        expected = trained.predict(x, 1).logits[:, 2:4]
    save_file({"x": x, "expected": expected.contiguous()}, str(tmp_path / "io.safetensors"))
    code = f"""
import json, sys
import timm, torch
from safetensors import safe_open
from safetensors.torch import load_file

path = {str(out)!r}
with safe_open(path, "pt") as f:
    meta = f.metadata()
kwargs, overlay = json.loads(meta["timm_kwargs"]), json.loads(meta["timm_pretrained_cfg_overlay"])
io = load_file({str(tmp_path / "io.safetensors")!r})
model = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=path, **overlay),
                          **kwargs).eval()
plain = timm.create_model(meta["timm_model"], pretrained=False, **kwargs).eval()
plain.load_state_dict(load_file(path), strict=True)
with torch.no_grad():
    for m in (model, plain):
        diff = (m(io["x"]) - io["expected"]).abs().max().item()
        assert diff <= 1e-5, diff
assert list(model.pretrained_cfg["label_names"]) == json.loads(meta["class_names"])
assert tuple(timm.data.resolve_data_config({{}}, model=model)["input_size"]) == (3, 16, 16)
assert kwargs["depth"] == 2 and meta["task"] == "1"
assert not [m for m in sys.modules if m == "retain" or m.startswith("retain.")], "retain was imported"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


REFUSED = {
    "ln_tuning": {"method.head_epochs": "1"},
    "confit": CONFIT_CNN,
    "l2p": {},
    "dualprompt": {"model.kwargs": "{depth: 6, embed_dim: 32, num_heads: 2, img_size: 16}"},
    "coda_prompt": {"model.kwargs": "{depth: 5, embed_dim: 32, num_heads: 2, img_size: 16}", "method.pool_size": "8"},
    "simplecil": {},
}


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_a_method_that_is_not_a_plain_timm_model_is_refused_in_one_line(tiny, tmp_path, capsys, method):
    extra = dict(REFUSED[method])
    protocol = extra.pop("scenario.protocol", "class_il")
    _train(tiny, method, protocol, **extra)
    out = tmp_path / "x.safetensors"
    argv = ["export", str(tmp_path / "runs" / f"{method}_{protocol}"), "-o", str(out), "--format", "timm"]
    assert main(argv + (["--task", "0"] if protocol == "task_il" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"retain: error: cannot export {method} to timm: ")
    assert NOT_PLAIN[method] in err[0] and "retain.load" in err[0] and "retain export RUN_DIR -o FILE" in err[0]
    assert not out.exists()


def test_task_ids_and_architectures_timm_does_not_have_are_refused(tiny, tmp_path, capsys):
    _train(tiny, "finetune", "task_il")
    run_dir = str(tmp_path / "runs" / "finetune_task_il")
    out = str(tmp_path / "x.safetensors")
    assert main(["export", run_dir, "-o", out, "--format", "timm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task-incremental run" in err[0] and "--task T" in err[0]
    assert main(["export", run_dir, "-o", out, "--format", "timm", "--task", "2"]) == 2
    assert "--task 2: the run has finished tasks 0..1" in capsys.readouterr().err
    assert main(["export", run_dir, "-o", out, "--task", "0"]) == 2  # the retain artefact holds every task
    assert "--task applies to --format timm" in capsys.readouterr().err
    _train(tiny, "finetune")
    assert main(["export", str(tmp_path / "runs" / "finetune_class_il"), "-o", out, "--format", "timm",
                 "--task", "0"]) == 2  # fmt: skip
    assert "--task applies to task-incremental runs" in capsys.readouterr().err
    _train(
        tiny, "finetune", "task_il", name="cnn", **{k: v for k, v in CONFIT_CNN.items() if k != "scenario.protocol"}
    )
    assert main(["export", str(tmp_path / "runs" / "cnn"), "-o", out, "--format", "timm", "--task", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "backbone cifar_resnet20 is retain's own architecture, which timm does not know" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_export_of_a_whole_model_says_self_contained(tiny, tmp_path, capsys):
    _train(tiny, "finetune")  # every backbone tensor trained: the artefact holds the whole model
    assert main(["export", str(tmp_path / "runs" / "finetune_class_il"), "-o", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "(self-contained)" in out and "e3b0c44298fc" not in out
    _train(tiny, "linear_probe")  # the artefact needs its frozen backbone
    assert (
        main(["export", str(tmp_path / "runs" / "linear_probe_class_il"), "-o", str(tmp_path / "b.safetensors")]) == 0
    )
    out = capsys.readouterr().out
    assert "(sha256 " in out and "self-contained" not in out
