"""Bad input: each case ends with one ``retain: error: ...`` line naming the problem and the fix, exit code 2, and
nothing already finished lost."""

import json
import os
import sys
import warnings

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from retain.cli import main
from retain.models import create_backbone


@pytest.fixture(autouse=True)
def _keep_threads():
    """demo/default sets train.threads=2, which a run applies to this process; later tests keep their count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _error(capsys, argv):
    """Run the CLI; assert exit code 2 and one stderr line; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retain: error: "), err
    return err[0].removeprefix("retain: error: ")


def _images(root, n=6, size=16):
    for c in ("a", "b", "c", "d"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (i * 40, ord(c), 0)).save(root / c / f"{i}.png")
    return root


def _folder_run(tiny, root, *extra):
    return ["run", "demo/default", *tiny(name="f", **{"data.name": "imagefolder", "data.root": str(root),
                                                      "data.options": "{}"}), *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- datasets


def test_missing_empty_and_unreadable_dataset_folders(tiny, tmp_path, capsys, monkeypatch):
    msg = _error(capsys, _folder_run(tiny, tmp_path / "nowhere"))
    hint = "pass root=<folder with one sub-folder of images per class>"
    assert msg == f"imagefolder: folder {tmp_path / 'nowhere'} does not exist; {hint}"
    (tmp_path / "empty").mkdir()
    msg = _error(capsys, _folder_run(tiny, tmp_path / "empty"))
    assert msg.startswith(f"no class folders in {tmp_path / 'empty'}; expected the layout")
    root = _images(tmp_path / "locked")
    real = os.scandir

    def scandir(path="."):
        if str(path) == str(root):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    msg = _error(capsys, _folder_run(tiny, root))
    assert msg.startswith(f"cannot read folder {root} (permission denied); make it readable")


def test_an_unreadable_image_stops_naming_it_or_is_skipped_with_a_counted_warning(tiny, tmp_path, capsys):
    root = _images(tmp_path / "imgs")
    (root / "b" / "broken.png").write_text("this is text, not an image")
    msg = _error(capsys, _folder_run(tiny, root))
    assert msg.startswith(f"cannot read image {root / 'b' / 'broken.png'} (cannot identify image file")
    assert msg.endswith("replace or delete it, or set data.bad_images=skip")
    with warnings.catch_warnings():  # shown as Python shows them outside pytest, which records them
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line)
        )
        assert main(_folder_run(tiny, root, "data.bad_images=skip")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"retain: warning: skipped 1 unreadable image file(s): {root / 'b' / 'broken.png'}"]


def test_a_truncated_image_stops_training_naming_it(tiny, tmp_path, capsys):
    root = _images(tmp_path / "imgs")
    noise = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(root / "c" / "3.png")
    data = (root / "c" / "3.png").read_bytes()
    (root / "c" / "3.png").write_bytes(data[: len(data) // 2])  # its header reads; its pixels do not
    msg = _error(capsys, _folder_run(tiny, root))
    assert msg.startswith(f"cannot read image {root / 'c' / '3.png'} (image file is truncated")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): .*3\.png$"):
        assert main(_folder_run(tiny, root, "data.bad_images=skip", "name=skipped")) == 0


def test_class_count_mismatch_with_the_preset(tiny, capsys):
    msg = _error(capsys, ["run", "demo/default", *tiny(), "data.num_classes=7"])
    assert msg.startswith("data.num_classes=7 but synthetic has 4 classes;")
    assert msg.endswith("or set data.num_classes=4")


# ---------------------------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(("override", "line"), [
    ("train.lr=-0.1", "train.lr=-0.1; it must be >= 0"),
    ("train.epochs=-1", "train.epochs=-1; it must be >= 0"),
    ("train.batch_size=0", "train.batch_size=0; it must be >= 1"),
    ("seed=-1", "seed=-1; use an integer in [0, 2**32)"),
    ("train.betas=[0.9]", "train.betas: expected 2 values, got [0.9]"),
    ("train.betas=0.9", "train.betas: expected a list, got 0.9"),
    ("train.batch_size=null", "train.batch_size: expected int, got None"),
    ("train.lr=1e-3x", "train.lr: expected float, got '1e-3x'"),
    ("run.checkpoint_every=soon", "run.checkpoint_every='soon'; valid: epoch, a number of steps (500), a time "
                                  "(10min, 1h) or off"),
    ("data.bad_images=ignore", "data.bad_images='ignore'; valid: stop, skip"),
])  # fmt: skip
def test_bad_override_values_name_the_key(capsys, override, line):
    assert _error(capsys, ["run", "demo/default", override]) == line


def test_override_numbers_lists_and_null_parse_as_meant(capsys):
    argv = ["run", "demo/default", "train.lr=1e-3", "train.weight_decay=5e-4", "train.stop_lr=1.0e12",
            "train.min_lr=-0e0", "train.betas=[0.8, 0.99]", "model.weights=null", "scenario.class_order=[3, 1, 2]",
            "run.checkpoint_every=500", "--print-config"]  # fmt: skip
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["train"]["lr"], cfg["train"]["weight_decay"], cfg["train"]["stop_lr"]) == (1e-3, 5e-4, 1e12)
    assert cfg["train"]["betas"] == [0.8, 0.99] and cfg["model"]["weights"] is None
    assert cfg["scenario"]["class_order"] == [3, 1, 2] and cfg["run"]["checkpoint_every"] == 500


# ---------------------------------------------------------------------------------------------------- weights


def test_weights_of_another_architecture_a_wrong_sha256_or_not_weights(tiny, tmp_path, capsys):
    other = create_backbone("cifar_resnet20", pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "resnet.safetensors"))
    msg = _error(capsys, ["run", "demo/default", *tiny(), f"model.weights={tmp_path / 'resnet.safetensors'}"])
    assert "does not fit vit_nano_patch4_32" in msg and "is it for another architecture?" in msg
    mine = create_backbone("vit_nano_patch4_32", pretrained=False, depth=1, embed_dim=32, num_heads=2, img_size=16)
    save_file({k: v.contiguous() for k, v in mine.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    msg = _error(capsys, ["run", "demo/default", *tiny(), f"model.weights={tmp_path / 'vit.safetensors'}",
                          "model.sha256=" + "ab" * 32])  # fmt: skip
    assert msg.startswith(f"weights file {tmp_path / 'vit.safetensors'} has sha256 ")
    assert msg.endswith(f"not model.sha256={'ab' * 32}: it is another file (or a corrupt copy); fetch the right one "
                        "or correct model.sha256")  # fmt: skip
    argv = ["run", "demo/default", *tiny(name="w"), f"model.weights={tmp_path / 'vit.safetensors'}"]
    assert main(argv) == 0
    save_file({k: v.contiguous() * 2 for k, v in mine.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    msg = _error(capsys, [*argv, "--resume"])  # the file changed under the run
    assert msg.startswith("--resume: the model built now is not the one this run started from (backbone.")
    (tmp_path / "notes.pth").write_text("not weights")
    msg = _error(capsys, ["run", "demo/default", *tiny(), f"model.weights={tmp_path / 'notes.pth'}"])
    assert msg.startswith(f"weights file {tmp_path / 'notes.pth'} is not a readable weights file (")


# ---------------------------------------------------------------------------------------------------- runs


def test_nan_loss_stops_naming_the_step(tiny, tmp_path, capsys):
    msg = _error(capsys, ["run", "demo/default", *tiny(name="nan"), "train.lr=1e6", "run.checkpoint_every=1"])
    assert msg.startswith(("loss became nan at step ", "loss became inf at step ")) or "no longer finite" in msg
    assert f"{tmp_path / 'runs' / 'nan'} keeps" in msg and msg.endswith("start a new run with another name=...")


def test_a_run_directory_from_an_older_config_is_refused_naming_the_key(tiny, tmp_path, capsys):
    argv = ["run", "demo/default", *tiny(name="old")]
    assert main(argv) == 0
    saved = tmp_path / "runs" / "old" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    del config["data"]["bad_images"]  # as written by a retain that did not have the key
    saved.write_text(yaml.safe_dump(config))
    msg = _error(capsys, [*argv, "data.bad_images=skip", "--resume"])
    assert msg == (
        "--resume: the saved config.yaml (an older retain) has no key data.bad_images, which is now "
        "'skip'; resume with data.bad_images='stop' or start a new run with another name=..."
    )
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0  # the key at its default: what the older retain did
    config["train"]["unknown_knob"] = 1
    saved.write_text(yaml.safe_dump(config))
    msg = _error(capsys, [*argv, "--resume"])
    assert msg.startswith("--resume: the saved config.yaml has train.unknown_knob=1, which this config does not")
    saved.write_text("train: [unclosed")
    assert "is not readable YAML" in _error(capsys, [*argv, "--resume"])
    assert json.loads((tmp_path / "runs" / "old" / "metrics.json").read_text())["finished_tasks"] == 2


def test_predict_on_missing_artefacts_and_images(tmp_path, capsys):
    assert _error(capsys, ["predict", str(tmp_path / "none.safetensors"), "x.png"]).startswith("no artefact at ")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    msg = _error(capsys, ["predict", str(tmp_path / "junk.safetensors"), "x.png"])
    assert msg.startswith(f"{tmp_path / 'junk.safetensors'} is not a safetensors file (")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    msg = _error(capsys, ["predict", str(tmp_path / "plain.safetensors"), "x.png"])
    assert (
        msg == f"{tmp_path / 'plain.safetensors'} is not a retain artefact (format None, expected retain-artefact-v1)"
    )


def test_an_error_from_a_dataloader_worker_is_the_workers_line():
    from torch._utils import ExceptionWrapper

    from retain.cli import _one_line
    from retain.data import UnreadableImageError

    try:
        raise UnreadableImageError("cannot read image a.png (image file is truncated); replace or delete it")
    except UnreadableImageError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(UnreadableImageError) as caught:
        wrapped.reraise()
    assert _one_line(caught.value) == "cannot read image a.png (image file is truncated); replace or delete it"
