"""A sweep's runs in their own processes: the argv of a run loads exactly the planned config; devices planned per
run; ``--jobs 2`` (real processes) gives the sequential sweep's accuracy matrices, statuses and errors; submitit's
local executor (real jobs): job ids in the index, a killed job shown ``interrupted`` by ``--status`` and resumed
by the same command, to the uninterrupted run's accuracy matrix. Nothing here is timed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retain.cli import build_parser, main
from retain.config import ConfigError, config_to_dict, load_config
from retain.launch import LOG_DIR, plan_resources, run_command
from retain.sweep import SWEEP_FILE, plan_sweep

ROOT = Path(__file__).resolve().parent.parent


def _index(path: Path) -> list[dict]:
    return json.loads((path / SWEEP_FILE).read_text())["runs"]


def _matrices(path: Path) -> dict[str, list]:
    return {r["name"]: json.loads((path / r["name"] / "metrics.json").read_text())["accuracy_matrix"]
            for r in _index(path) if (path / r["name"] / "metrics.json").is_file()}  # fmt: skip


def test_a_runs_argv_loads_the_planned_config(tiny, tmp_path):
    # a choice section swept before a key of that section: the order of the command is kept
    over = tiny(name="argv") + ["method.name=lwf,ewc", "seed=0,1", "method.lamb=0.5", "train.lr=1e-3"]
    sweep = plan_sweep("demo/default", over, tmp_path / "sw")
    assert {c.method.lamb for c in sweep.configs.values()} == {0.5}
    assert len(sweep.configs) == 4
    for name, cfg in sweep.configs.items():
        argv = run_command(sweep, name)
        assert argv[:3] == [sys.executable, "-m", "retain"]
        args = build_parser().parse_args(argv[3:])
        assert (args.command, args.preset, args.resume) == ("run", "demo/default", False)
        assert config_to_dict(load_config(args.preset, args.overrides)) == config_to_dict(cfg)
    name = next(iter(sweep.configs))
    argv = run_command(sweep, name, resume=True, extra=["train.threads=3"], nproc=2)
    assert argv[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[5:8] == ["-m", "retain", "run"] and argv[-2:] == ["train.threads=3", "--resume"]


def test_devices_per_run(tiny, tmp_path):
    gpu = plan_sweep("demo/default", tiny(name="g", **{"train.device": "auto"}) + ["seed=0,1"], tmp_path / "g")
    assert plan_resources(gpu, 2, None, gpus=["0", "1", "2"]).gpu_groups == ["0", "1"]
    res = plan_resources(gpu, 1, 2, gpus=["4", "5", "6"])
    assert (res.gpu_groups, res.nproc, res.extra) == (["4,5"], 2, [])
    with pytest.raises(ConfigError, match=r"--jobs 2 x --gpus-per-run 2 needs 4 GPUs; 3 visible"):
        plan_resources(gpu, 2, 2, gpus=["0", "1", "2"])
    cpu = plan_sweep("demo/default", tiny(name="c") + ["seed=0,1"], tmp_path / "c")  # the preset's threads: 2
    cpus = len(os.sched_getaffinity(0))
    assert plan_resources(cpu, 2, None, gpus=["0"]).extra == [f"train.threads={max(1, cpus // 2)}"]
    assert plan_resources(cpu, 1, None, gpus=[]).extra == []
    given = plan_sweep("demo/default", tiny(name="t", **{"train.threads": "1"}) + ["seed=0,1"], tmp_path / "t")
    assert plan_resources(given, 2, None, gpus=[]).extra == []  # the command's own train.threads is kept
    with pytest.raises(ConfigError, match="--gpus-per-run 2: no GPU is visible"):
        plan_resources(cpu, 1, 2, gpus=[])
    with pytest.raises(ConfigError, match="--jobs 0"):
        plan_resources(cpu, 0, None, gpus=[])


def test_jobs_2_gives_the_sequential_sweeps_results(tiny, tmp_path, capsys):
    # 4 runs, 2 of which fail at run time (a non-finite loss): the same statuses, errors and matrices both ways
    over = tiny(name="j", **{"train.threads": "1"}) + ["seed=0,1", "train.lr=5e-4,1e30"]
    with pytest.warns(UserWarning, match="2 of 4 runs have no metrics yet"):  # the table shows the others
        assert main(["sweep", "demo/default", *over, "--out", str(tmp_path / "seq")]) == 2
    capsys.readouterr()
    with pytest.warns(UserWarning, match="2 of 4 runs have no metrics yet"):
        assert main(["sweep", "demo/default", *over, "--out", str(tmp_path / "par"), "--jobs", "2"]) == 2
    out, err = capsys.readouterr()
    assert "1/4 seed=0_lr=5e-4: starting" in out and "(pid " in out
    assert err.strip().splitlines()[-1].startswith("retain: error: 2 run(s) of the sweep did not finish")
    seq, par = _index(tmp_path / "seq"), _index(tmp_path / "par")
    assert [(r["name"], r["status"]) for r in par] == [(r["name"], r["status"]) for r in seq]
    assert [r["status"] for r in par] == ["finished", "failed", "finished", "failed"]
    errors = [str(r["error"]).replace("/par/", "/seq/") for r in par]
    assert errors == [str(r["error"]) for r in seq] and par[1]["error"].startswith("loss became nan")
    assert _matrices(tmp_path / "par") == _matrices(tmp_path / "seq") and len(_matrices(tmp_path / "par")) == 2
    assert (tmp_path / "par" / LOG_DIR / "seed=0_lr=1e30.log").read_text().startswith("[retain sweep] pid ")


def _sweep_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "retain", "sweep", *args]


def _pid(log: Path) -> int:
    """The pid of the newest process that ran the run (the header its launcher writes to the run's log)."""
    return int(re.findall(r"^\[retain sweep\] pid (\d+)", log.read_text(), re.M)[-1])


def test_submitit_local_jobs_a_preempted_job_requeues_and_a_killed_one_resumes(tiny, tmp_path, capsys):
    # two runs in their second task: seed=0's job is preempted (SIGUSR2, as Slurm signals it), saves a checkpoint,
    # is requeued by submitit and resumes on its own; seed=1's run is killed (SIGKILL, a node lost): the sweep
    # ends with it interrupted, and the same command resumes it. Both end as the sequential sweep's runs.
    over = tiny(name="s", **{"train.threads": "1", "train.epochs": "25"}) + ["seed=0,1"]
    out = tmp_path / "sw"
    command = _sweep_cli("demo/default", *over, "--out", str(out), "--launcher", "local", "--jobs", "2")
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acted: set[str] = set()
    while sweep.poll() is None and len(acted) < 2:
        for name in {"seed=0", "seed=1"} - acted:
            try:
                if json.loads((out / name / "metrics.json").read_text())["finished_tasks"] != 1:
                    continue
            except (OSError, ValueError, KeyError):
                continue
            run_pid = _pid(out / LOG_DIR / f"{name}.log")
            if name == "seed=0":  # the job's own process (the run's parent) gets the cluster's preemption signal
                job_pid = int(Path(f"/proc/{run_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                os.kill(job_pid, signal.SIGUSR2)
            else:
                os.kill(run_pid, signal.SIGKILL)
            acted.add(name)
        time.sleep(0.05)
    assert len(acted) == 2, sweep.communicate()
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 2, stderr
    assert "1 run(s) of the sweep did not finish, seed=1 first" in stderr
    runs = _index(out)
    assert [(r["name"], r["status"], r["launcher"]) for r in runs] == [("seed=0", "finished", "local"),
                                                                       ("seed=1", "interrupted", "local")]  # fmt: skip
    assert all(r["job_id"].isdigit() for r in runs) and runs[0]["job_id"] != runs[1]["job_id"]
    log0 = (out / LOG_DIR / "seed=0.log").read_text()
    assert "saving a checkpoint at the next step" in log0
    assert log0.count("[retain sweep] pid ") == 2 and log0.split("[retain sweep] pid ")[-1].split("\n")[0].endswith(
        " --resume"
    )  # requeued: the same job, resumed
    status = subprocess.run(_sweep_cli("--status", str(out)), capture_output=True, text=True, check=True).stdout
    lines = status.splitlines()
    assert lines[0] == f"sweep {out} (2 runs)"
    assert lines[1].split() == ["finished", "seed=0", "local", "job", f"{runs[0]['job_id']}:", "COMPLETED"]
    assert lines[2].split()[:5] == ["interrupted", "seed=1", "local", "job", f"{runs[1]['job_id']}:"]

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "seed=0: finished before, skipped" in again.stdout and "seed=1: resuming as local job" in again.stdout
    assert [r["status"] for r in _index(out)] == ["finished", "finished"]
    assert _pid(out / LOG_DIR / "seed=1.log") and " --resume" in (out / LOG_DIR / "seed=1.log").read_text()

    # the same sweep, one run after another in this process and never stopped: the same accuracy matrices
    assert main(["sweep", "demo/default", *over, "--out", str(tmp_path / "seq")]) == 0
    capsys.readouterr()
    assert _matrices(out) == _matrices(tmp_path / "seq") and len(_matrices(out)) == 2


def _fake_slurm(bin_dir: Path, states: str) -> None:
    """sbatch (keeps each submission file, answers job 4242, then 4243...), srun, and sacct answering ``states``."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\nn=$(ls "$(dirname "$0")"/submitted-* 2>/dev/null | wc -l)\n'
        'cp "$1" "$(dirname "$0")/submitted-$n"\necho "Submitted batch job $((4242 + n))"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sacct").write_text(f"#!/bin/sh\nprintf 'JobID|State|NodeList\\n{states}'\n")
    for f in ("sbatch", "srun", "sacct"):
        (bin_dir / f).chmod(0o755)


def test_slurm_array_options_status_and_resubmission(tiny, tmp_path, monkeypatch, capsys):
    # a fake Slurm (sbatch, srun, sacct on PATH): what is submitted, how, and what a rerun resubmits
    bin_dir, out = tmp_path / "bin", tmp_path / "sw"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    _fake_slurm(bin_dir, "4242_0|RUNNING|n1\\n4242_1|PENDING|\\n")
    args = ["sweep", "demo/default", *tiny(name="sl", **{"train.device": "auto"}), "seed=0,1", "--out", str(out),
            "--launcher", "slurm", "--jobs", "2", "--partition", "gpu", "--account", "lab", "--time", "60",
            "--launcher-set", "slurm_qos=high", "--launcher-set", "mem_gb=32"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "seed=0: submitted as slurm job 4242_0" in printed and f"retain sweep --status {out}" in printed
    script = (bin_dir / "submitted-0").read_text()
    for line in ("--array=0-1%2", "--partition=gpu", "--account=lab", "--time=60", "--qos=high", "--mem=32GB",
                 "--gpus-per-node=1", "--cpus-per-task=8", "--signal=USR2@90"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    runs = _index(out)
    assert [(r["status"], r["job_id"], r["launcher"]) for r in runs] == [("submitted", "4242_0", "slurm"),
                                                                         ("submitted", "4242_1", "slurm")]  # fmt: skip
    assert main(["sweep", "--status", str(out)]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[1].split() == ["pending", "seed=0", "(index:", "submitted)", "slurm", "job", "4242_0:", "RUNNING"]
    assert status[2].split()[-1] == "PENDING"

    assert main(args) == 0  # both jobs still queued or running: nothing submitted
    assert "still queued or running as slurm job 4242_1" in capsys.readouterr().out
    assert not (bin_dir / "submitted-1").exists()
    _fake_slurm(bin_dir, "4242_0|RUNNING|n1\\n4242_1|CANCELLED|\\n")  # one job cancelled: only its run again
    assert main(args) == 0
    assert "seed=1: submitted as slurm job 4243\n" in capsys.readouterr().out  # one job: not an array
    assert "--array" not in (bin_dir / "submitted-1").read_text()
    assert [r["job_id"] for r in _index(out)] == ["4242_0", "4243"]
    # the job's callable: the run's argv, --resume when its folder holds a started run
    import pickle

    job = pickle.loads((out / ".submitit" / "4243" / "4243_submitted.pkl").read_bytes()).function
    assert job.fresh[-1] != "--resume" and job.resume[-1] == "--resume" and job.fresh == job.resume[:-1]


def test_ctrl_c_stops_the_running_runs_with_a_checkpoint_and_the_same_command_resumes(tiny, tmp_path):
    over = tiny(name="c", **{"train.threads": "1", "train.epochs": "25"})
    out = tmp_path / "sw"
    command = _sweep_cli("demo/default", *over, "seed=0,1", "--out", str(out), "--jobs", "2")
    # started with SIGINT ignored, as in the background of a non-interactive shell (CI): Ctrl-C must still stop it
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=ignore)  # fmt: skip
    first = None
    while sweep.poll() is None and first is None:  # until a run is in its second task (both have started)
        for s in (0, 1):
            try:
                if json.loads((out / f"seed={s}" / "metrics.json").read_text())["finished_tasks"] == 1:
                    first = f"seed={s}"
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.05)
    assert sweep.poll() is None, sweep.communicate()
    sweep.send_signal(signal.SIGINT)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("retain: interrupted: 2 running run(s) stopped") and last.endswith(" --jobs 2")
    assert f"continue with: retain sweep demo/default {over[0]}" in last
    statuses = {r["name"]: r["status"] for r in _index(out)}
    assert statuses[first] == "interrupted" and set(statuses.values()) <= {"interrupted", "pending"}
    assert "saving a checkpoint at the next step" in (out / LOG_DIR / f"{first}.log").read_text()

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"{first}: resuming" in again.stdout
    assert [r["status"] for r in _index(out)] == ["finished", "finished"]
    assert all(len(m) == 2 and len(m[1]) == 2 for m in _matrices(out).values())


def test_an_index_without_job_ids_still_loads(tiny, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    sweep = plan_sweep("demo/default", tiny(name="o") + ["seed=0,1"], out)
    old = {"preset": sweep.preset, "fixed": sweep.fixed, "grid": sweep.grid,
           "runs": [{"name": r.name, "overrides": r.overrides, "status": "pending", "error": None}
                    for r in sweep.runs]}  # fmt: skip  # as written before job ids
    (out / SWEEP_FILE).write_text(json.dumps(old))
    again = plan_sweep("demo/default", tiny(name="o") + ["seed=0,1"], out)
    assert [(r.name, r.job_id, r.launcher) for r in again.runs] == [("seed=0", None, None), ("seed=1", None, None)]
    assert main(["sweep", "--status", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["  pending     seed=0", "  pending     seed=1"]
    assert main(["sweep", "--status", str(out), "seed=0"]) == 2  # a folder only
    assert main(["sweep", "demo/default", "seed=0,1", "--partition", "gpu"]) == 2  # a launcher's option alone
    assert "--partition applies to --launcher slurm" in capsys.readouterr().err
    for flag in ("--jobs", "--gpus-per-run"):  # 0 is refused before anything runs, not read as the default
        assert main(["sweep", "demo/default", "seed=0,1", flag, "0", "--out", str(tmp_path / "zero")]) == 2
        assert capsys.readouterr().err.strip() == f"retain: error: {flag} 0: give at least 1"
    assert not (tmp_path / "zero").exists()
