"""RunConfig: the one typed configuration of a training run, composed from the sections' own configs.

Precedence: defaults < YAML file (``--config``) < ``--section.field=value`` overrides. Unknown
sections or fields are errors. Every run saves its RunConfig as ``config.yaml`` (:data:`CONFIG`);
:func:`load_run_config` reads it back. The data and train sections are defined here; the others
live with the code they configure (model, lora, heads, checkpoint, eval).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_sharding import storage
from data_sharding.shards import write_atomic
from data_sharding.stream import StreamConfig
from trainer.checkpoint import CheckpointConfig
from trainer.errors import ConfigError
from trainer.evaluate import EvalConfig
from trainer.heads import HeadsConfig
from trainer.model import LoraConfig, ModelConfig

CONFIG = "config.yaml"
"""The RunConfig of a run folder, as trained (``eval.exclude_seen: auto`` already decided)."""
FROZEN_SECTIONS = ("model", "lora", "heads")
"""Sections that define the network: a run cannot resume with different values."""


@dataclass
class DataConfig:
    """Which shards to train on and how to read them."""

    path: str = ""
    """Dataset folder written by `bgpt shard`."""
    num_workers: int | None = None
    """DataLoader worker processes per rank reading shards; None (auto) decides from the cores each
    rank has (trainer.runtime.loader_workers): on GPUs min(4, cores - 1); on CPU, where the
    training step itself keeps the cores busy, none below 4 cores, else min(2, cores // 4)."""
    pack: bool = True
    """Pack several windows into each row of a training batch (attention stays within each window):
    the same samples, targets and loss, without computing the padding of short histories."""
    pack_width: int | None = None
    """Positions per packed row (default model.max_len + 1, one full window)."""
    pack_row_multiple: int = 1
    """Packed batches get a multiple of this many rows (rows of padding added): few distinct batch
    shapes for compiled steps and CUDA graphs, which recompile or re-record per shape (one shape
    when it is micro_batch_size, at the cost of computing every padding row). 1: as few rows as fit."""
    generations: str = "state"
    """state (every user's latest sequence), latest (the newest generation only) or a generation number."""
    focus_new: bool = False
    """Train only on the newest generation's events (with their history as context) plus a replay
    sample; set by `bgpt retrain`."""
    replay_fraction: float = 0.1
    """With focus_new: share of users whose whole history is replayed alongside the new events."""
    train_on_valid: bool = False
    """A final refit: the validation events become training targets too, so the model also learns
    each user's most recent transition before it is tested. Nothing is left to validate on: choose
    the configuration and step count (train.max_steps) on an ordinary run first; the refit keeps
    its last weights as ``best/``."""
    validate_on_newest: bool = False
    """Hold out the newest generation: train on the dataset as it stood before it, and validate by
    predicting every event of it from everything before (next-period protocol, as deployed).
    Choose the step count this way, then refit on everything (this false, train.max_steps set)."""

    @property
    def root(self) -> storage.Root:
        """The dataset location: a local folder as a Path, a URL as a string (one place derives it)."""
        return storage.as_root(self.path)

    def __post_init__(self) -> None:
        if self.validate_on_newest and (self.train_on_valid or self.focus_new):
            raise ConfigError("data.validate_on_newest does not combine with train_on_valid or focus_new")


@dataclass
class TrainConfig:
    """Optimisation, schedule, budget and logging."""

    micro_batch_size: int = 64
    """Windows per device per forward pass."""
    grad_accum: int = 1
    """Micro batches per optimizer step; global batch = micro_batch_size x processes x grad_accum."""
    global_batch_size: int | None = None
    """Windows per optimizer step over all processes. When set, grad_accum is derived from it and
    the process count, so the optimisation is the same on 1 process or 64."""
    lr: float = 1e-3
    item_lr: float = 0.05
    """Learning rate of a sharded item table's row-wise Adagrad (model.item_table), on the same
    warmup and decay schedule as ``lr``."""
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: str = "cosine"
    """cosine, linear or constant decay after warmup."""
    epochs: int = 10
    max_steps: int | None = None
    """Stop after this many optimizer steps (default: epochs x steps per epoch)."""
    max_minutes: float | None = None
    """Wall-clock training budget; the best validated weights are kept."""
    clip_grad: float = 1.0
    seed: int = 0
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU: CPU bf16 matmuls are far slower), fp32 or bf16."""
    eval_every: int = 200
    """Validate every N optimizer steps (0: only at the end)."""
    patience: int = 5
    """Stop after this many validations without a better valid NDCG@10 (0: never)."""
    compile: bool = False
    """``torch.compile`` the backbone (dynamic shapes: packed batches vary in rows). Off by default:
    on CPU it took ~49 s to warm up and ran no faster on the Sports recipe (issue 19's note); on
    GPUs `benchmarks/gpu_bench.py` measures it (its ``default_compiled`` arm)."""
    ema_decay: float = 0.0
    """Validate, early-stop and keep in ``best/`` an exponential moving average of the trainable
    weights with this decay per optimizer step (e.g. 0.999; 0: off, the raw weights). DDP or one
    process with a dense item table (trainer.ema)."""
    collective_timeout_minutes: float = 60.0
    """How long a collective (all-reduce, barrier) waits for every rank before the process group
    fails. The other ranks wait in one while the main process validates, so it must outlast the
    longest validation (torch's default, 10 to 30 minutes by backend, does not at scale)."""
    log_every: int = 10
    tensorboard: bool = False
    init_from: str | None = None
    """A checkpoint folder whose trainable weights start this run (item and event-type tables grown
    for new ids, old rows unchanged); the optimizer and schedule start fresh (a warm restart)."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.schedule {self.schedule!r}: choose cosine, linear or constant")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision {self.precision!r}: choose auto, fp32 or bf16")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError("train.global_batch_size must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay {self.ema_decay}: use a value in [0, 1), e.g. 0.999 (0: off)")
        if self.collective_timeout_minutes <= 0:
            raise ConfigError("train.collective_timeout_minutes must be > 0")

    def accumulation(self, world_size: int) -> int:
        """Micro batches per optimizer step on each of ``world_size`` processes."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {world_size} processes; change one of them"
            )
        return self.global_batch_size // per_step


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.time_bias and self.heads.time_weight > 0:
            raise ConfigError(
                "model.time_bias shows each state the time of the event it predicts: "
                "set heads.time_weight=0 (the time-to-next head would read its answer)"
            )
        width, window = self.data.pack_width, self.model.max_len + 1
        if self.data.pack and width is not None and width < window:
            raise ConfigError(
                f"data.pack_width {width} cannot hold one training window: model.max_len + 1 = {window} events"
            )

    def sync_free_step(self, cuda: bool) -> bool:
        """heads.sync_free as set, or (None) on GPUs when batches are packed and every event is a
        target: then nearly every position is a loss row anyway. With many positions that are no
        target (unpacked rows, data.focus_new) computing them all costs more than the syncs."""
        if self.heads.sync_free is not None:
            return self.heads.sync_free
        return cuda and self.data.pack and not self.data.focus_new

    def training_stream(self, until_generation: int | None = None) -> StreamConfig:
        """How the run's training windows are cut, ordered, batched and packed."""
        data = self.data
        return StreamConfig(
            max_len=self.model.max_len,
            batch_size=self.train.micro_batch_size,
            seed=self.train.seed,
            generations=data.generations,
            focus_new=data.focus_new,
            replay_fraction=data.replay_fraction if data.focus_new else 0.0,
            include_valid=data.train_on_valid,
            until_generation=until_generation,
            pack=data.pack,
            pack_width=data.pack_width,
            pack_row_multiple=data.pack_row_multiple,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, run: Path) -> None:
        """Write ``run/config.yaml`` atomically: the other ranks of a resumed job read it meanwhile
        (``check_compatible``), and a truncated file read as an empty config."""
        write_atomic(run / CONFIG, self.to_yaml().encode())


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


def load_run_config(run: Path) -> RunConfig:
    """The RunConfig a run folder was trained with."""
    if not (run / CONFIG).exists():
        raise ConfigError(f"{run}: not a run folder (no {CONFIG}); train one with `bgpt train`")
    return build_config(yaml.safe_load((run / CONFIG).read_text()))


def check_compatible(run: Path, cfg: RunConfig) -> None:
    """A resumed run keeps the network it was trained with (:data:`FROZEN_SECTIONS`)."""
    saved = yaml.safe_load((run / CONFIG).read_text())
    wanted = cfg.to_dict()
    for section in FROZEN_SECTIONS:
        if saved.get(section) != wanted[section]:
            changed = sorted(k for k in wanted[section] if saved.get(section, {}).get(k) != wanted[section][k])
            raise ConfigError(
                f"{run} was trained with a different {section} section ({', '.join(changed)}); "
                f"use a new --out or the original settings"
            )
