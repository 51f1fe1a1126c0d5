"""Storage per task by one rule (docs/metrics.md): ``bytes_per_task`` is what a deployment keeps to serve a task
beyond what it would keep without it, checked for every registered method in each protocol against the artefact,
which keeps every deployed tensor that differs from the model the run started from."""

import pytest
from safetensors.torch import load_file

from retain.artefact import ARTEFACT_FILE
from retain.config import load_config
from retain.engine import train
from retain.methods import method_names

from conftest import CONFIT_CNN


def _trained(name, tiny, protocol):
    extra = {"method.name": name, "scenario.protocol": protocol, "train.lr": "0.05", "run.export_each_task": "true",
             "name": name}  # fmt: skip
    if name == "confit":
        extra = CONFIT_CNN | extra
    record, method = train(load_config(None, tiny(**extra)), log=lambda *_: None)
    return record, method, method.scenario.tasks


def _nbytes(tensors):
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _bookkeeping(name):
    """Deployed tensors training changes that serve no prediction: BatchNorm's batch counter (read only when momentum
    is None) and Xconv BN's bookkeeping (the current task's input means and sizes, which tasks have a snapshot)."""
    tracker = name.startswith("xbn.trackers.") and name.endswith((".mean", ".size"))
    return name.endswith(".num_batches_tracked") or name == "xbn.stored" or tracker


@pytest.mark.parametrize("name", method_names())
def test_one_task_per_deployment_owns_everything_it_changed(name, tiny, tmp_path):
    """Fine-tuning protocol: the task's bytes are the artefact's (less bookkeeping), tensor by tensor."""
    record, method, (task,) = _trained(name, tiny, "finetune")
    artefact = load_file(str(tmp_path / "runs" / name / ARTEFACT_FILE))
    own = method.task_state(task)
    assert record["storage_rule"] == "deployment" and record["bytes_per_task"] == [method.bytes_per_task(task)]
    served = {k: v for k, v in artefact.items() if not _bookkeeping(k)}
    assert served.keys() == own.keys(), sorted(served.keys() ^ own.keys())
    assert all(served[k].numel() == own[k].numel() for k in own)
    assert _nbytes(served) == method.bytes_per_task(task) > 0


@pytest.mark.parametrize("protocol", ["class_il", "task_il"])
@pytest.mark.parametrize("name", method_names())
def test_in_a_stream_shared_tensors_belong_to_the_model_and_the_rest_to_tasks(name, protocol, tiny, tmp_path):
    """Class- and task-IL: every tensor the artefact keeps is claimed by a task's ``task_state`` or trained by every
    task (shared and overwritten: the model's), and what a task claims is in the artefact with as many values."""
    if name == "confit" and protocol == "class_il":
        pytest.skip("ConFiT is task-incremental (its presets and the paper); class-IL runs it as finetune + BN")
    record, method, tasks = _trained(name, tiny, protocol)
    assert record["storage_rule"] == "stream"
    artefact = load_file(str(tmp_path / "runs" / name / ARTEFACT_FILE))
    claimed = [method.task_state(t) for t in tasks]
    every_task = set.intersection(*(set(method.trained_state(t)) for t in tasks))
    for k, v in artefact.items():
        owners = [i for i, own in enumerate(claimed) if k in own]
        assert owners or k in every_task or _bookkeeping(k), f"{k} is kept but neither a task's nor the model's"
        assert sum(claimed[i][k].numel() for i in owners) <= v.numel()  # its own rows of a table, or all of it
    for i, own in enumerate(claimed):
        assert own and all(k in artefact for k in own), f"task {i} claims a tensor the artefact does not keep"
    assert record["bytes_per_task"] == [_nbytes(own) for own in claimed]
