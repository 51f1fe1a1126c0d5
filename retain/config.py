"""Typed run configuration: dataclass defaults -> preset YAML -> ``key=value`` overrides, merged and saved.

Presets are YAML files under ``retain/configs/<group>/<name>.yaml`` and hold only deviations from the defaults.
A YAML file's ``defaults: BASE`` is merged under it: a ``.yaml`` path relative to that file, else a shipped preset
name, else a path relative to the working directory (:func:`resolve_defaults`).
Unknown keys are rejected with the list of valid ones, at load time.

A *choice section* (today only ``method``) is a field whose dataclass is chosen by its ``name`` key among those
registered in a :class:`~retain.registry.Registry` that lives here (``METHOD_CONFIGS``). Model code registers into
it (``retain.methods.base.register_method``); this module imports no model code, only, on a lookup of a name not
registered yet, the registry's provider module named by a string (``"retain.methods"``).
"""

from __future__ import annotations

import functools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from retain.registry import Registry

__all__ = [
    "ConfigError",
    "DataConfig",
    "RetentionConfig",
    "ScenarioConfig",
    "RunOptions",
    "BAD_IMAGES",
    "checkpoint_interval",
    "checkpoints_kept",
    "ModelConfig",
    "TrainConfig",
    "RunConfig",
    "METHOD_CONFIGS",
    "ChoiceSection",
    "choice",
    "choice_sections",
    "config_name",
    "YAMLLoader",
    "load_yaml",
    "PRESET_DIR",
    "preset_names",
    "resolve_preset",
    "resolve_defaults",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "save_config",
    "from_dict",
]

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------- choice sections

# keys an earlier retain had, and what replaces them (named in the error instead of the list of valid keys)
MOVED = {"export_path": "set run.export_each_task=true (runs/<name>/artefact.safetensors after every task), or "
         "write one with `retain export RUN_DIR -o FILE`"}  # fmt: skip
METHOD_CONFIGS = Registry("method", provider="retain.methods")  # method config dataclasses by method name

_CHOICE = "retain.choice"  # dataclass field metadata key holding a ChoiceSection


@dataclass(frozen=True)
class ChoiceSection:
    """A config section whose dataclass is the one registered in ``registry`` under the section's ``name`` key."""

    registry: Registry
    default: str  # the name chosen when the section is absent

    def config_class(self, name: str) -> type:
        """The dataclass registered as ``name``; KeyError listing the valid names otherwise."""
        return self.registry.get(name)

    def create(self, name: str | None = None) -> Any:
        """The default-valued config of ``name`` (default: the section's default name)."""
        return self.config_class(self.default if name is None else name)()


def choice(registry: Registry, default: str) -> Any:
    """A dataclass field that is a choice section, e.g. ``method: Any = choice(METHOD_CONFIGS, "finetune")``."""
    section = ChoiceSection(registry, default)
    return field(default_factory=section.create, metadata={_CHOICE: section})


def config_name(cls: type) -> str:
    """The name a choice-section dataclass is registered under: the default of its ``name`` field."""
    if is_dataclass(cls):
        for f in fields(cls):
            if f.name == "name" and isinstance(f.default, str) and f.default:
                return f.default
    raise TypeError(f'{getattr(cls, "__name__", cls)} needs a dataclass field `name: str = "<its name>"`')


@dataclass
class RetentionConfig:
    """A dataset of the pre-training domain whose weighted k-NN accuracy (DINO) on backbone features is tracked."""

    name: str | None = None  # None: no retention probe
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    k: int = 20
    temperature: float = 0.07


BAD_IMAGES = ("stop", "skip")


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
    augment: str = "none"  # none | crop_flip | rrc | pad_rrc | resize_pad_rrc (retain.data.transforms)
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    resize: str = "direct"  # direct | crop (resize to size/0.875, centre crop)
    interpolation: str = "bilinear"
    # resize + normalise on the device, batched, after the random crop and flip at the native resolution on the CPU
    # (retain.data.device_resize; equal to the CPU transform up to uint8 rounding, at most 1.1/255 a pixel); meant
    # for small images upsampled (32-px CIFAR at 224 px); not with augment=crop_flip
    device_resize: bool = False
    retention: RetentionConfig = field(default_factory=lambda: RetentionConfig())
    bad_images: str = "stop"  # stop (name the first unreadable image file) | skip (drop them with a warning)

    def __post_init__(self) -> None:
        if self.bad_images not in BAD_IMAGES:
            raise ConfigError(f"data.bad_images={self.bad_images!r}; valid: {', '.join(BAD_IMAGES)}")


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
    val_fraction: float = 0.0  # held out of each task's train set per class (seeded) for validation; FACIL: 0.1


@dataclass
class ModelConfig:
    """Backbone by name (timm tag or one of ours) and where its weights come from."""

    backbone: str = "vit_micro_patch4_32.retain_cifar10"  # shipped, works offline
    pretrained: bool = True
    weights: str | None = None  # local safetensors / weights_only .pth file; overrides the tag's source
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (depth, embed_dim, ...)
    sha256: str | None = None  # expected sha256 of the weights file (model.weights, or the shipped tag's file)


@dataclass
class TrainConfig:
    """The engine's loop: optimiser, schedule, batch, precision, device."""

    epochs: int = 1
    steps: int | None = None  # budget per stage in optimiser steps instead of epochs (None: epochs)
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # constant | cosine | plateau (needs scenario.val_fraction > 0)
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine: final lr
    patience: int = 20  # plateau: epochs without a lower validation loss before the lr is divided
    lr_factor: float = 3.0  # plateau: lr /= lr_factor (FACIL)
    stop_lr: float = 1e-4  # plateau: the stage stops when the lr falls below this (FACIL's lr_min)
    restore_best: bool = True  # plateau: reload the lowest-validation-loss weights at each decay and at the end
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    drop_last: bool = False
    # dataloader worker processes: auto (retain.engine.loading.auto_workers: the CPUs of this process's share of the
    # node minus one, at most 16; 0 on a CPU device and for small in-memory data) or a number; results do not depend
    # on it (every sample's augmentation has its own seed), so it may change on --resume
    num_workers: int | str = "auto"
    persistent_workers: bool = True  # keep a training loader's workers between epochs (with workers > 0)
    prefetch_factor: int = 2  # batches each worker loads ahead (with workers > 0)
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast, used only on a GPU
    # TF32 for float32 matmuls and cuDNN convolutions on a CUDA device (Ampere or newer); no effect on CPU. What was
    # used is written to metrics.json ("precision"); false: full float32 (torch >= 1.12's matmul default)
    tf32: bool = True
    compile: bool = False  # torch.compile the backbone's forward_features (meant for a GPU; retain.engine.compiling)
    # steps between the host's reads of the training values (loss check, epoch means, TensorBoard, Ctrl-C agreement
    # of several processes): 1 reads every step; results do not depend on it. A non-finite loss stops the run at the
    # next read, naming its step; nothing after it is saved
    sync_every: int = 10
    # multi-process runs (torchrun, docs/distributed.md): global = batch_size is one step's batch over all
    # processes (each takes batch_size / N) | per_process = each takes batch_size; lr_scaling: none | linear (x N,
    # per_process only). The processes, batches and lr used are written to metrics.json ("distributed").
    batch_scope: str = "global"
    lr_scaling: str = "none"
    threads: int | None = None  # torch.set_num_threads on CPU
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, str) and self.num_workers != "auto":
            raise ConfigError(f"train.num_workers={self.num_workers!r}; use auto or a number of worker processes (0: "
                              "load in the training process)")  # fmt: skip
        least = {"epochs": 0, "steps": 0, "batch_size": 1, "eval_batch_size": 1, "lr": 0, "weight_decay": 0,
                 "threads": 1, "num_workers": 0, "prefetch_factor": 1, "sync_every": 1}  # fmt: skip
        for key, low in least.items():
            value = getattr(self, key)
            if isinstance(value, int | float) and value < low:
                raise ConfigError(f"train.{key}={value}; it must be >= {low}")


_INTERVAL = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(min|m|s|h)\s*$")
_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def checkpoint_interval(every: int | str | bool | None) -> tuple[int | None, float | None, bool]:
    """``run.checkpoint_every`` as (steps, seconds, at epoch ends); ConfigError naming the valid forms."""
    if every is None or every is False or every == "off":  # YAML reads a bare off as false
        return None, None, False
    if every == "epoch":
        return None, None, True
    if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
        return every, None, True
    match = _INTERVAL.match(every) if isinstance(every, str) else None
    if match and float(match.group(1)) > 0:
        return None, float(match.group(1)) * _SECONDS[match.group(2)], True
    raise ConfigError(f"run.checkpoint_every={every!r}; valid: epoch, a number of steps (500), a time (10min, 1h) "
                      "or off")  # fmt: skip


def checkpoints_kept(keep: int | str) -> int | None:
    """``run.keep_checkpoints`` as the number of newest per-task checkpoints kept (None: all); ConfigError naming
    the valid forms."""
    if keep == "all":
        return None
    if keep == "last":
        return 1
    if isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1:
        return keep
    raise ConfigError(f"run.keep_checkpoints={keep!r}; valid: last, all or a number of newest tasks to keep (>= 1)")


@dataclass
class RunOptions:
    """How a run is saved while it runs (not what it computes): may change on ``--resume``."""

    # mid-task checkpoints: at each epoch end (epoch), also every N optimiser steps (N) or every so often (10min, 1h),
    # or none (off: only the per-task checkpoints)
    checkpoint_every: int | str | bool | None = "epoch"
    # after every task, also write the run's artefact (retain-artefact-v1, as `retain export`) to
    # runs/<name>/artefact.safetensors, so a stopped run leaves a deployable model of its finished tasks
    export_each_task: bool = False
    # per-task checkpoints (checkpoints/task_NNN.safetensors) kept once a newer one and the run state naming it are
    # written: last (what --resume and `retain export` read) | all | N (the newest N)
    keep_checkpoints: int | str = "last"

    def __post_init__(self) -> None:
        checkpoint_interval(self.checkpoint_every)
        checkpoints_kept(self.keep_checkpoints)


@dataclass
class RunConfig:
    """Everything a run needs; saved resolved as ``runs/<name>/config.yaml``."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    checkpoint: bool = True
    run: RunOptions = field(default_factory=RunOptions)
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = choice(METHOD_CONFIGS, "finetune")  # a MethodConfig subclass chosen by ``method.name``

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed={self.seed}; use an integer in [0, 2**32)")
        for f in fields(self):  # None in a choice section: its default
            if _CHOICE in f.metadata and getattr(self, f.name) is None:
                setattr(self, f.name, f.metadata[_CHOICE].create())


@functools.cache
def choice_sections(cls: type = RunConfig) -> Mapping[str, ChoiceSection]:
    """The choice sections of dataclass ``cls`` (nested ones included) by dotted path, e.g. ``{"method": ...}``."""
    hints = typing.get_type_hints(cls)
    out: dict[str, ChoiceSection] = {}
    for f in fields(cls):
        if _CHOICE in f.metadata:
            out[f.name] = f.metadata[_CHOICE]
        elif is_dataclass(hints[f.name]):
            out.update({f"{f.name}.{k}": v for k, v in choice_sections(hints[f.name]).items()})
    return types.MappingProxyType(out)


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
    if tp is int and isinstance(value, float):  # 1e4 reads as a float
        if value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r} (not a whole number)")
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
        if unknown[0] in MOVED:
            raise ConfigError(f"{where}{unknown[0]} is gone: {MOVED[unknown[0]]}")
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys here: {', '.join(valid)}")
    sections = {f.name: f.metadata[_CHOICE] for f in fields(cls) if _CHOICE in f.metadata}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in sections:
            kwargs[name] = _choice_from_dict(sections[name], value, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _choice_from_dict(section: ChoiceSection, value: Any, key: str) -> Any:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(
            f"{key}: expected a mapping with a 'name' (e.g. {key}.name={section.default}), got {value!r}"
        )
    if not isinstance(value["name"], str):
        raise ConfigError(f"{key}.name: expected str, got {value['name']!r}")
    try:
        cls = section.config_class(value["name"])
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


class YAMLLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats: ``1e-3``, ``5e-4``, ``1.0e12``, ``-2E+3`` (YAML 1.1: strings)."""


YAMLLoader.add_implicit_resolver(  # after the 1.1 float/int resolvers, which it only extends (no dot, unsigned exp)
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(stream: str | bytes | IO[str] | IO[bytes]) -> Any:
    """Parse YAML as presets and override values are parsed: safe, with YAML 1.2 floats."""
    return yaml.load(stream, Loader=YAMLLoader)


def _parse_value(text: str) -> Any:
    return load_yaml(text) if text != "" else ""


def _parent(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """The dict holding the leaf of ``dotted`` (intermediate sections created) and the leaf's key."""
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section")
    return node, leaf


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node, leaf = _parent(tree, dotted)
    node[leaf] = value


def _as_section(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _merge_choice(old: Any, new: Any) -> Any:
    """A choice section updated by ``new``: merged when the name stays the same, else replaced by ``new``."""
    old, new = _as_section(old), _as_section(new)
    if isinstance(old, dict) and isinstance(new, dict) and new.get("name", old.get("name")) == old.get("name"):
        return {**old, **new}
    return new  # another choice: the previous one's options are dropped


def apply_overrides(tree: dict[str, Any], overrides: list[str], cls: type = RunConfig) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML) to a nested dict for dataclass ``cls``, in place.

    Setting a choice section (``method=lwf``, ``method.name=lwf`` or ``method={name: lwf, ...}``) to another name
    drops the previous choice's options; the same name keeps them.
    """
    sections = choice_sections(cls)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
        key, text = item.split("=", 1)
        value = _parse_value(text)
        if key in sections:
            node, leaf = _parent(tree, key)
            node[leaf] = _merge_choice(node.get(leaf), value)
        elif key.endswith(".name") and key[: -len(".name")] in sections:
            node, leaf = _parent(tree, key[: -len(".name")])
            node[leaf] = _merge_choice(node.get(leaf), {"name": value})
        else:
            for path in sections:  # `method: lwf` (a bare name) becomes a section before `method.lamb=...`
                if key.startswith(path + "."):
                    node, leaf = _parent(tree, path)
                    node[leaf] = _as_section(node.get(leaf, {}))
            _set_dotted(tree, key, value)
    return tree


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults -> preset YAML (``defaults:`` may name a base preset, see :func:`resolve_defaults`) -> overrides,
    validated."""
    tree: dict[str, Any] = _load_tree(resolve_preset(preset)) if preset else {}
    apply_overrides(tree, overrides or [])
    return from_dict(RunConfig, tree)


def resolve_defaults(name: str, including: str | Path) -> Path:
    """The file a YAML file's ``defaults: NAME`` names, ``including`` being that YAML file.

    In this order: a ``.yaml``/``.yml`` path relative to the including file's folder (or absolute); a shipped
    preset name (``pad/cifar100_lwf``); a ``.yaml``/``.yml`` path relative to the working directory (what earlier
    versions read; kept so that such files still load). A preset name has no suffix and a path has one, so the
    first two never compete: a file's base next to it wins over one of the same name in the working directory.
    ConfigError naming the including file, the name and where it was looked for, otherwise.
    """
    including = Path(including)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{including}: defaults: expected a preset name or a path to a .yaml file, got {name!r}")
    path = Path(name).expanduser()
    is_yaml = path.suffix in (".yaml", ".yml")
    if is_yaml and (including.parent / path).is_file():
        return including.parent / path
    if not is_yaml and (PRESET_DIR / f"{name}.yaml").is_file():
        return PRESET_DIR / f"{name}.yaml"
    if is_yaml and path.is_file():
        return path
    if is_yaml:
        where = [str(including.parent / path)] + ([] if path.is_absolute() else [str(Path.cwd() / path)])
        looked = "no file " + " nor ".join(where)
    else:
        looked = "no shipped preset of that name (see `retain list`); a path to a file ends in .yaml"
    raise ConfigError(f"{including}: defaults: {name!r} not found: {looked}")


_MAX_DEFAULTS = 32  # a chain this long is a mistake even without a cycle


def _load_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML file ``path`` merged over its ``defaults:`` chain; ``chain``: the files that included it."""
    chain = (*chain, path)
    with open(path) as f:
        tree = load_yaml(f) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    name = tree.pop("defaults", None)
    if name is None or name == "":
        return tree
    base = resolve_defaults(name, path)
    if base.resolve() in {p.resolve() for p in chain}:
        loop = " -> ".join(str(p) for p in (*chain, base))
        raise ConfigError(f"{path}: defaults: {name!r} makes a cycle of includes: {loop}")
    if len(chain) >= _MAX_DEFAULTS:
        raise ConfigError(f"{path}: defaults: {name!r} is the {len(chain) + 1}th file of one chain of includes; "
                          f"at most {_MAX_DEFAULTS}")  # fmt: skip
    merged = _load_tree(base, chain)
    _deep_update(merged, tree)
    return merged


def _deep_update(
    base: dict[str, Any], new: dict[str, Any], sections: Mapping[str, ChoiceSection] | None = None, prefix: str = ""
) -> None:
    """Merge preset ``new`` into its base preset ``base``; a choice section merges only under the same name."""
    sections = choice_sections(RunConfig) if sections is None else sections
    for k, v in new.items():
        path = prefix + k
        if path in sections:
            base[k] = _merge_choice(base.get(k), v)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v, sections, path + ".")
        else:
            base[k] = v


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write ``cfg`` resolved, as YAML (the run's ``config.yaml``)."""
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
