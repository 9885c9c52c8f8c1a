"""RunConfig: the one typed configuration of a training run, composed from the sections' own configs.

Precedence: defaults < YAML file (``--config``) < ``--section.field=value`` overrides. Unknown
sections or fields are errors. Every run saves its RunConfig as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.checkpoint import CheckpointConfig
from trainer.errors import ConfigError
from trainer.evaluate import EvalConfig
from trainer.heads import HeadsConfig
from trainer.loop import DataConfig, TrainConfig
from trainer.model import LoraConfig, ModelConfig


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _convert(value, annotation, where: str):
    """Coerce a YAML/CLI value to a field's annotated type (str, int, float, bool, list, optional)."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    if hints:
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in hints:
            return None
        errors = []
        for hint in hints:
            if hint is type(None):
                continue
            try:
                return _convert(value, hint, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot use {value!r}")
    origin = typing.get_origin(annotation)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, inner, where) for v in items]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def build_config(sections: dict[str, dict]) -> RunConfig:
    """RunConfig from nested dicts, checking every section and field name and value."""
    root_types = typing.get_type_hints(RunConfig)
    built = {}
    for name, values in (sections or {}).items():
        if name not in root_types:
            raise ConfigError(f"unknown config section {name!r}; sections are {', '.join(root_types)}")
        cls = root_types[name]
        fields = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in (values or {}).items():
            if key not in fields:
                raise ConfigError(f"unknown config key {name}.{key}; {name} has {', '.join(fields)}")
            kwargs[key] = _convert(value, fields[key], f"{name}.{key}")
        try:
            built[name] = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"config section {name}: {e}") from None
    return RunConfig(**built)


def parse_overrides(args: list[str]) -> dict[str, dict]:
    """``--section.field=value`` (or ``--section.field value``) -> nested dict."""
    out: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing value")
            i += 1
            value = args[i]
        section, _, name = key.partition(".")
        out.setdefault(section.replace("-", "_"), {})[name.replace("-", "_")] = value
        i += 1
    return out


def merge(base: dict, extra: dict) -> dict:
    merged = {k: dict(v or {}) for k, v in base.items()}
    for section, values in extra.items():
        merged.setdefault(section, {}).update(values)
    return merged


def load_config(path: str | Path | None, overrides: dict[str, dict]) -> RunConfig:
    sections: dict = {}
    if path is not None:
        try:
            sections = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from None
        if not isinstance(sections, dict):
            raise ConfigError(f"{path}: expected sections (data, model, lora, heads, train, checkpoint, eval)")
    return build_config(merge(sections, overrides))
