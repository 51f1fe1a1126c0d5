import inspect
from pathlib import Path

import pytest
import yaml

from retain.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    from_dict,
    load_config,
    load_yaml,
    preset_names,
    save_config,
)
from retain.methods import method_names


def test_defaults_then_preset_then_overrides():
    cfg = load_config("demo/default", ["train.epochs=7", "scenario.order_seed=null", "data.rrc_scale=[0.5, 1.0]"])
    assert cfg.data.name == "digits"  # from the preset
    assert cfg.train.epochs == 7  # override beats preset
    assert cfg.train.weight_decay == 0.0  # dataclass default
    assert cfg.scenario.order_seed is None
    assert cfg.data.rrc_scale == (0.5, 1.0)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch; valid keys here: epochs, steps, batch_size"):
        load_config(None, ["train.epoch=3"])


def test_unknown_method_option_is_rejected_with_that_methods_keys():
    with pytest.raises(ConfigError, match=r"unknown key method\.lamb.*valid keys here: name, train_mask"):
        load_config(None, ["method.name=finetune", "method.lamb=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 'many'"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"train\.progress: expected true/false"):
        load_config(None, ["train.progress=3"])


def test_unknown_method_name_lists_methods():
    with pytest.raises(ConfigError, match="unknown method 'nope'; valid names: " + ", ".join(method_names())):
        load_config(None, ["method.name=nope"])


def test_switching_method_drops_previous_options_keeping_same_method_options():
    cfg = load_config(None, ["method.name=linear_probe", "method.train_mask=current", "method.name=linear_probe"])
    assert cfg.method.name == "linear_probe" and cfg.method.train_mask == "current"
    cfg = load_config(None, ["method.train_mask=current", "method.name=simplecil"])
    assert cfg.method.name == "simplecil" and cfg.method.train_mask == "seen"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("demo/default", ["train.lr=0.123", "scenario.class_order=[4,3,2,1,0,5,6,7,8,9]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(RunConfig, yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.method.name in method_names()


def test_missing_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="no preset or YAML file named 'nope/none'"):
        load_config("nope/none")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(None, ["train.epochs"])


# ------------------------------------------------------------------------------------------ choice sections (method)


def test_default_method_is_finetune():
    assert RunConfig().method == RunConfig(method=None).method
    default = {"name": "finetune", "train_mask": "seen", "trainable_blocks": None}
    assert config_to_dict(RunConfig())["method"] == default
    assert list(config_to_dict(RunConfig()))[-1] == "method"  # saved config.yaml keeps its layout


def test_method_section_by_bare_name_mapping_or_name_key():
    assert load_config(None, ["method=lwf"]).method.name == "lwf"
    cfg = load_config(None, ["method={name: lwf, lamb: 2}", "method={temperature: 3}"])  # same name: merged
    assert (cfg.method.name, cfg.method.lamb, cfg.method.temperature) == ("lwf", 2.0, 3.0)
    cfg = load_config(None, ["method=lwf", "method.lamb=2", "method={name: ewc}"])  # another name: replaced
    assert cfg.method == load_config(None, ["method.name=ewc"]).method
    with pytest.raises(ConfigError, match=r"method\.name: expected str, got 3"):
        load_config(None, ["method.name=3"])


def test_preset_defaults_merge_method_only_under_the_same_name(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train: {epochs: 4}\nmethod: {name: lwf, lamb: 2.0}\n")
    (tmp_path / "same.yaml").write_text(f"defaults: {base}\ntrain: {{lr: 0.1}}\nmethod: {{temperature: 5}}\n")
    (tmp_path / "other.yaml").write_text(f"defaults: {base}\nmethod: {{name: ewc}}\n")
    (tmp_path / "bare.yaml").write_text(f"defaults: {base}\nmethod: lwf\n")
    cfg = load_config(str(tmp_path / "same.yaml"))
    assert (cfg.train.epochs, cfg.train.lr) == (4, 0.1)
    assert (cfg.method.name, cfg.method.lamb, cfg.method.temperature) == ("lwf", 2.0, 5.0)
    assert load_config(str(tmp_path / "other.yaml")).method == load_config(None, ["method=ewc"]).method
    assert load_config(str(tmp_path / "bare.yaml")).method.lamb == 2.0


def test_every_method_name_is_written_once():
    from retain.config import METHOD_CONFIGS, config_name
    from retain.methods import METHODS

    assert METHOD_CONFIGS.names() == METHODS.names() == method_names()
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert cls.name == name == config_name(cls.config_class) == cls.config_class().name
        assert METHOD_CONFIGS.get(name) is cls.config_class
        assert Path(inspect.getfile(cls)).name == f"{name}.py" and Path(inspect.getfile(cls)).parent.name == "methods"


def test_register_method_rejects_a_second_spelling_of_the_name():
    from retain.config import config_name
    from retain.methods import METHODS, MethodConfig, register_method

    lwf = METHODS.get("lwf")
    with pytest.raises(ValueError, match=r"register_method\('lw_f'\) on LwF: its config_class's name is 'lwf'"):
        register_method("lw_f")(lwf)
    with pytest.raises(ValueError, match="'lwf' is already registered"):
        register_method("lwf")(lwf)
    with pytest.raises(TypeError, match="MethodConfig needs a dataclass field `name"):
        config_name(MethodConfig)


# ----------------------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e-3", 1e-3), ("5e-4", 5e-4), ("1.0e12", 1.0e12), ("-2E+3", -2000.0), (".5", 0.5), ("1e3", 1000.0),
     ("+1.5e-2", 0.015), ("0.1", 0.1), ("1.0e+12", 1.0e12)],
)  # fmt: skip
def test_yaml_floats(text, expected):
    assert type(load_yaml(text)) is float and load_yaml(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3", 3), ("-7", -7), ("0", 0), ("true", True), ("false", False), ("null", None), ("~", None),
     ("cifar100", "cifar100"), ("1e-3abc", "1e-3abc"), ("e5", "e5"), ("1e", "1e"), ("1.2.3", "1.2.3"),
     ("[1e-3, 2]", [1e-3, 2]), ("{a: 5e-4}", {"a": 5e-4})],
)  # fmt: skip
def test_yaml_non_floats_unchanged(text, expected):
    assert load_yaml(text) == expected and type(load_yaml(text)) is type(expected)


def test_float_overrides_and_int_fields():
    cfg = load_config(None, ["train.lr=1e-3", "train.weight_decay=5e-4", "train.stop_lr=1.0e12", "train.steps=1e4"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.stop_lr) == (1e-3, 5e-4, 1.0e12)
    assert cfg.train.steps == 10000 and type(cfg.train.steps) is int
    assert type(load_config(None, ["train.epochs=2e0"]).train.epochs) is int
    assert load_config(None, ["data.name=cifar100"]).data.name == "cifar100"
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 2\.5 \(not a whole number\)"):
        load_config(None, ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 0\.001"):
        load_config(None, ["train.steps=1e-3"])
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got '1e-3abc'"):
        load_config(None, ["train.lr=1e-3abc"])


def test_preset_file_floats(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("defaults: demo/default\ntrain:\n  lr: 5e-4\n  weight_decay: 1e-3\n  steps: 2e3\n")
    cfg = load_config(str(path))
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.steps) == (5e-4, 1e-3, 2000)
    assert cfg.data.name == "digits"  # from demo/default
    save_config(cfg, tmp_path / "config.yaml")
    assert config_to_dict(from_dict(RunConfig, load_yaml((tmp_path / "config.yaml").read_text()))) == config_to_dict(
        cfg
    )


def test_a_key_that_moved_names_its_replacement():
    with pytest.raises(ConfigError, match=r"^method\.export_path is gone: set run\.export_each_task=true"):
        load_config(None, ["method.name=lora", "method.export_path=x.safetensors"])


# ------------------------------------------------------------------------------- `defaults:` of a user's YAML file


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_resolve_next_to_the_including_file_from_another_cwd(tmp_path, monkeypatch):
    _write(tmp_path / "sub" / "base.yaml", "train: {epochs: 4, lr: 0.5}\n")
    child = _write(tmp_path / "sub" / "child.yaml", "defaults: base.yaml\ntrain: {lr: 0.1}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write(elsewhere / "base.yaml", "train: {epochs: 99}\n")  # the working directory's file of that name loses
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(child))
    assert (cfg.train.epochs, cfg.train.lr) == (4, 0.1)
    monkeypatch.chdir(tmp_path)
    assert load_config("sub/child.yaml").train.epochs == 4  # a relative path to the child too


def test_defaults_chain_each_relative_to_its_own_file(tmp_path, monkeypatch):
    _write(tmp_path / "a" / "b" / "root.yaml", "defaults: demo/default\ntrain: {epochs: 7}\n")  # a shipped preset
    _write(tmp_path / "a" / "b" / "mid.yaml", "defaults: root.yaml\ntrain: {lr: 0.3}\n")
    _write(tmp_path / "a" / "top.yaml", "defaults: b/mid.yaml\nseed: 5\n")
    monkeypatch.chdir(tmp_path / "a" / "b")  # where root.yaml is, not where top.yaml is
    cfg = load_config(str(tmp_path / "a" / "top.yaml"))
    assert (cfg.seed, cfg.train.lr, cfg.train.epochs, cfg.data.name) == (5, 0.3, 7, "digits")  # digits: demo/default


def test_defaults_shipped_preset_and_working_directory_fallback(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    _write(sub / "shipped.yaml", "defaults: pad/cifar100_lwf\nseed: 3\n")
    assert load_config(str(sub / "shipped.yaml")).method.name == "lwf"
    # a path the earlier resolution read from the working directory still loads
    _write(tmp_path / "configs" / "base.yaml", "train: {epochs: 6}\n")
    _write(tmp_path / "configs" / "child.yaml", "defaults: configs/base.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/child.yaml").train.epochs == 6


def test_missing_defaults_names_the_including_file_and_the_name(tmp_path, monkeypatch):
    child = _write(tmp_path / "sub" / "child.yaml", "defaults: base.yaml\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(str(child))
    message = str(info.value)
    assert message.startswith(f"{child}: defaults: 'base.yaml' not found: no file {tmp_path / 'sub' / 'base.yaml'}")
    assert str(tmp_path / "base.yaml") in message and "\n" not in message
    _write(child, "defaults: nope/none\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: defaults: 'nope/none' not found: no shipped preset"):
        load_config(str(child))


def test_defaults_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    _write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match=r"makes a cycle of includes: .*a\.yaml -> .*b\.yaml -> .*a\.yaml$"):
        load_config(str(tmp_path / "a.yaml"))
