"""Typed run configuration: dataclass defaults -> preset YAML -> ``key=value`` overrides, merged and saved.

Presets are YAML files under ``retain/configs/<group>/<name>.yaml`` and hold only deviations from the defaults.
Unknown keys are rejected with the list of valid ones, at load time.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "RetentionConfig",
    "ScenarioConfig",
    "ModelConfig",
    "TrainConfig",
    "RunConfig",
    "PRESET_DIR",
    "preset_names",
    "resolve_preset",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "save_config",
    "from_dict",
]

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key and the fix."""


@dataclass
class RetentionConfig:
    """A dataset of the pre-training domain whose weighted k-NN accuracy (DINO) on backbone features is tracked."""

    name: str | None = None  # None: no retention probe
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    k: int = 20
    temperature: float = 0.07


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how images are turned into tensors."""

    name: str = "synthetic"
    root: str | None = None
    download: bool = False
    cache_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific, e.g. {n_classes: 10}
    num_classes: int | None = None  # lets `retain inspect` work without the data; checked against it at run time
    image_size: int | None = None  # None: the backbone's input size
    normalize: str = "backbone"  # backbone | none | imagenet | half (mean=std=0.5)
    augment: str = "none"  # none | crop_flip | rrc
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    resize: str = "direct"  # direct | crop (resize to size/0.875, centre crop)
    interpolation: str = "bilinear"
    retention: RetentionConfig = field(default_factory=lambda: RetentionConfig())


@dataclass
class ScenarioConfig:
    """How the classes are split into tasks and how tasks are evaluated."""

    protocol: str = "class_il"  # class_il | task_il | finetune
    n_tasks: int = 5
    first_task_classes: int | None = None  # larger first task (e.g. 50 of 100); None: equal split
    classes_per_task: int | None = None  # fixed task size, the last task holds the remainder
    use_tasks: int | None = None  # keep only the first k tasks (ConFiT's Caltech-101 uses 10 of 11)
    class_order: list[int] | None = None  # explicit order; overrides order_seed
    order_seed: int | None = 0  # None: natural order 0..C-1
    order_rng: str = "python"  # python (random.seed; random.shuffle) | torch (manual_seed; randperm)
    train_fraction: float = 1.0  # keep a seeded per-class fraction of each task's train set (quick runs)
    test_fraction: float = 1.0


@dataclass
class ModelConfig:
    """Backbone by name (timm tag or one of ours) and where its weights come from."""

    backbone: str = "vit_micro_patch4_32.retain_cifar10"  # shipped, works offline
    pretrained: bool = True
    weights: str | None = None  # local safetensors / weights_only .pth file; overrides the tag's source
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (depth, embed_dim, ...)


@dataclass
class TrainConfig:
    """The engine's loop: optimiser, schedule, batch, precision, device."""

    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # constant | cosine
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    drop_last: bool = False
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast, used only on a GPU
    threads: int | None = None  # torch.set_num_threads on CPU
    progress: bool = True
    tensorboard: bool = True


@dataclass
class RunConfig:
    """Everything a run needs; saved resolved as ``runs/<name>/config.yaml``."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    checkpoint: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = None  # a MethodConfig subclass chosen by ``method.name``

    def __post_init__(self) -> None:
        if self.method is None:
            from retain.methods import method_config_class

            self.method = method_config_class("finetune")()


# ----------------------------------------------------------------------------------------------- dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type; raise ConfigError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        return origin(_coerce(v, args[0], key) for v in value) if args else origin(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with the list of valid ones."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys here: {', '.join(valid)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if cls is RunConfig and name == "method":
            kwargs[name] = _method_from_dict(value, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _method_from_dict(value: Any, key: str) -> Any:
    from retain.methods import method_config_class

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{key}: expected a mapping with a 'name' (e.g. method.name=finetune), got {value!r}")
    try:
        cls = method_config_class(value["name"])
    except KeyError as e:
        raise ConfigError(f"{key}.name: {e.args[0]}") from None
    return from_dict(cls, value, key)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(asdict(cfg))


# ----------------------------------------------------------------------------------------------- presets + overrides


def preset_names() -> list[str]:
    """All shipped presets as ``group/name``."""
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.glob("*/*.yaml"))


def resolve_preset(name_or_path: str) -> Path:
    """A shipped preset name (``demo/finetune``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"no preset or YAML file named {name_or_path!r}; run `retain list` for presets, or pass a path to a .yaml file"
    )


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section")
    node[leaf] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
        key, text = item.split("=", 1)
        value = _parse_value(text)
        if key in ("method", "method.name"):
            current = tree.get("method") or {}
            current = {"name": current} if isinstance(current, str) else current
            # switching to another method drops the previous method's options
            tree["method"] = current if current.get("name") == value else {"name": value}
            continue
        _set_dotted(tree, key, value)
    return tree


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults -> preset YAML (``defaults:`` may name a base preset) -> overrides, validated."""
    tree: dict[str, Any] = _load_tree(preset) if preset else {}
    apply_overrides(tree, overrides or [])
    return from_dict(RunConfig, tree)


def _load_tree(preset: str, depth: int = 0) -> dict[str, Any]:
    path = resolve_preset(preset)
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    base = tree.pop("defaults", None)
    if base and depth < 8:
        merged = _load_tree(base, depth + 1)
        _deep_update(merged, tree)
        return merged
    return tree


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "method":
            _deep_update(base[k], v)
        elif k == "method" and isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = ({**base[k], **v}) if v.get("name", base[k].get("name")) == base[k].get("name") else v
        else:
            base[k] = v


def save_config(cfg: RunConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
