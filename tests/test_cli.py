import json

from retain.cli import main


def test_run_end_to_end_then_report(tiny, tmp_path, capsys):
    assert main(["run", "demo/default", *tiny(name="cli")]) == 0
    out = capsys.readouterr().out
    assert "average_accuracy" in out
    run_dir = tmp_path / "runs" / "cli"
    assert json.loads((run_dir / "metrics.json").read_text())["finished_tasks"] == 2
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "accuracy.png").stat().st_size > 0


def test_bad_key_is_one_line_and_exit_2(capsys):
    assert main(["run", "demo/default", "train.epoch=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retain: error: unknown key train.epoch; valid keys here: epochs")


def test_existing_run_refused_without_resume_keeps_results(tiny, tmp_path, capsys):
    assert main(["run", "demo/default", *tiny(name="twice")]) == 0
    before = (tmp_path / "runs" / "twice" / "metrics.json").read_text()
    assert main(["run", "demo/default", *tiny(name="twice")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "runs" / "twice" / "metrics.json").read_text() == before


def test_print_config_and_list(capsys):
    assert main(["run", "demo/default", "train.epochs=9", "--print-config"]) == 0
    assert "epochs: 9" in capsys.readouterr().out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "demo/default" in out and "resnet18.tv_in1k" in out


def test_inspect_json_without_downloads(capsys):
    assert main(["inspect", "demo/default", "model.backbone=vit_base_patch16_224.augreg_in21k_ft_in1k",
                 "method.name=linear_probe", "--json"]) == 0  # fmt: skip
    info = json.loads(capsys.readouterr().out)
    assert info["trainable_params"] == 768 * 2 + 2  # two classes per task on the digits stream
    assert info["bytes_per_task"] > 0
