import pytest
import yaml

from retain.config import ConfigError, RunConfig, config_to_dict, from_dict, load_config, preset_names, save_config
from retain.methods import method_names


def test_defaults_then_preset_then_overrides():
    cfg = load_config("demo/default", ["train.epochs=7", "scenario.order_seed=null", "data.rrc_scale=[0.5, 1.0]"])
    assert cfg.data.name == "digits"  # from the preset
    assert cfg.train.epochs == 7  # override beats preset
    assert cfg.train.weight_decay == 0.0  # dataclass default
    assert cfg.scenario.order_seed is None
    assert cfg.data.rrc_scale == (0.5, 1.0)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch; valid keys here: epochs, batch_size"):
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
