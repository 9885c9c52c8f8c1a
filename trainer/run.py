"""A run folder: ``config.yaml``, checkpoints, ``best/``, validation log and ``metrics.json``.

``train_run`` creates or resumes a run; ``load_run_model`` rebuilds a trained model for
evaluation and prediction; ``evaluate_run`` scores a split and writes ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from data_sharding import shards, storage
from data_sharding.stream import ShardDataset, StreamConfig
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError
from trainer.evaluate import EvalConfig, evaluate_model, resolve_exclude_seen
from trainer.factory import build_model, parameter_counts
from trainer.loop import (
    LOG_FILE,
    STOP_FILE,
    STOPPED_FILE,
    VALID_LOG,
    Trainer,
    all_cores,
    make_accelerator,
    stopped_marker,
)
from trainer.next_period import KnownItems, ModelScorer, evaluate_next_period
from trainer.periods import resolve_period
from trainer.priors import PAIRS_FILE, count_pairs, save_pairs

CONFIG = "config.yaml"
# Sections that define the network: a run cannot resume with different values.
FROZEN_SECTIONS = ("model", "lora", "heads")


def _check_compatible(run: Path, cfg_dict: dict) -> None:
    saved = yaml.safe_load((run / CONFIG).read_text())
    for section in FROZEN_SECTIONS:
        if saved.get(section) != cfg_dict[section]:
            changed = sorted(k for k in cfg_dict[section] if saved.get(section, {}).get(k) != cfg_dict[section][k])
            raise ConfigError(
                f"{run} was trained with a different {section} section ({', '.join(changed)}); "
                f"use a new --out or the original settings"
            )


def train_run(run: Path, cfg, log=print) -> dict:
    """Train (or resume) the run in ``run``; return the test metrics of the best validated weights."""
    data = storage.as_root(cfg.data.path)
    manifest = shards.load_manifest(data)
    accelerator = make_accelerator(cfg.train, run)
    if cfg.eval.exclude_seen == "auto":  # decided once, from the data, and recorded in config.yaml
        quiet = log if accelerator.is_main_process else _quiet
        cfg.eval.exclude_seen = resolve_exclude_seen("auto", data, quiet)
    cfg_dict = dataclasses.asdict(cfg)
    resume_from = None
    if cfg.checkpoint.resume == "auto" and (run / CONFIG).exists():
        resume_from = ckpt.latest_valid(run, log)
    elif cfg.checkpoint.resume not in ("auto", "none"):
        resume_from = Path(cfg.checkpoint.resume)
        problem = ckpt.verify(resume_from)
        if problem:
            raise ConfigError(f"cannot resume from {resume_from}: {problem}")
    if resume_from is not None:
        _check_compatible(run, cfg_dict)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            for stale in ("best", VALID_LOG, LOG_FILE, STOPPED_FILE):
                target = run / stale
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        (run / "metrics.json").unlink(missing_ok=True)  # proves that this request finished, once it has
        (run / CONFIG).write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        (run / "data_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if cfg.model.transition_prior and (resume_from is None or not (run / PAIRS_FILE).exists()):
            _count_training_pairs(run, cfg, data, manifest)
    accelerator.wait_for_everyone()

    torch.manual_seed(cfg.train.seed)
    model, info = build_model(cfg.model, cfg.lora, cfg.heads, data, cache=run)
    if resume_from is None and cfg.train.init_from:
        from trainer.retrain import grow_and_load

        source = Path(cfg.train.init_from)
        problem = ckpt.verify(source)
        if problem:
            raise ConfigError(f"train.init_from {source}: {problem}")
        grow_and_load(model, source, log if accelerator.is_main_process else _quiet)
    trainable, total = parameter_counts(model)
    if accelerator.is_main_process:
        log(f"model: {trainable:,} trainable of {total:,} parameters; {info.num_items:,} item ids")
    if cfg.train.tensorboard:
        accelerator.init_trackers("bgpt")
    trainer = Trainer(run, cfg, model, info.vocab_version, accelerator, log if accelerator.is_main_process else _quiet)
    if resume_from is not None:
        trainer.resume(resume_from)
    started = time.perf_counter()
    state = trainer.fit()
    if trainer.preempted:
        accelerator.end_training()  # also closes the process group
        return {"stopped_at_step": state.step, "resume": "run the same command again"}
    if trainer.zero_stage == 3:
        # Training is over: the test model below is built in one process, so transformers must not
        # partition it with deepspeed.zero.Init (a collective the other ranks would never join).
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    metrics = {}
    if accelerator.is_main_process:
        with all_cores():
            metrics = _final_metrics(run, cfg, trainer, log)
        metrics["train"] = {**state.to_dict(), "wall_seconds_this_process": round(time.perf_counter() - started, 1)}
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _count_training_pairs(run: Path, cfg, data, manifest: dict) -> None:
    """The transition prior's counts, from exactly the events this run trains on."""
    holdout = int(manifest["generation"]) - 1 if cfg.data.validate_on_newest else None
    model = cfg.model
    num_items = int(manifest["vocab"]["num_items"])
    pairs = count_pairs(
        data, num_items, model.transition_neighbors, model.transition_steps, holdout, cfg.data.train_on_valid
    )
    save_pairs(run / PAIRS_FILE, pairs)


def _final_metrics(run: Path, cfg, trainer: Trainer, log) -> dict:
    """The test split of the best weights; for a run validated on the newest generation, that
    validation (there is nothing later to test on); nothing without a test split."""
    if trainer.holdout is not None:
        best = ckpt.read_state(run / "best")
        return {
            "protocol": "next-period",
            "period": trainer.holdout.label(),
            "best_step": best["step"],
            **best["valid"],
        }
    test = ShardDataset(storage.as_root(cfg.data.path), StreamConfig(split="test"))
    if test.num_samples == 0:
        log("no test split in the data: evaluate with `bgpt eval --protocol next-period` on the next generation")
        return {"split": "test", "count": 0}
    return evaluate_run(run, "test", log=log)


def _quiet(*args, **kwargs) -> None:
    return None


def run_status(run: Path) -> dict:
    """What a run folder holds: finished or not, the latest valid checkpoint (and any newer one
    that fails verification), steps logged of those requested, a pending stop request."""
    if not (run / CONFIG).exists():
        raise ConfigError(f"{run}: not a run folder (no {CONFIG})")
    train = (yaml.safe_load((run / CONFIG).read_text()) or {}).get("train", {})
    invalid: list[str] = []
    latest = ckpt.latest_valid(run, log=invalid.append)
    logged = 0
    if (run / LOG_FILE).exists():
        for line in (run / LOG_FILE).read_text().splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                logged = max(logged, int(json.loads(line).get("step", 0)))
    stop = run / STOP_FILE
    return {
        "run": str(run),
        "finished": (run / "metrics.json").exists(),
        "requested_steps": train.get("max_steps"),
        "epochs": train.get("epochs"),
        "latest_checkpoint": str(latest) if latest else None,
        "latest_checkpoint_step": ckpt.read_state(latest)["step"] if latest else None,
        "invalid_newer_checkpoints": invalid,
        "last_logged_step": logged,
        "stopped": stopped_marker(run),
        "stop_requested": (stop.read_text().strip() or "any attempt") if stop.exists() else None,
        "best_step": ckpt.read_state(run / "best")["step"] if ckpt.verify(run / "best") is None else None,
    }


def load_run_config(run: Path):
    from launch.configs import build_config

    if not (run / CONFIG).exists():
        raise ConfigError(f"{run}: not a run folder (no {CONFIG}); train one with `bgpt train`")
    return build_config(yaml.safe_load((run / CONFIG).read_text()))


def weights_source(run: Path, weights: str = "best", log=print) -> Path:
    """The folder whose weights a trained run is used with: ``best/`` (the best validation score),
    else the latest valid checkpoint; an error when neither verifies."""
    best = run / "best"
    if weights == "best" and best.exists():
        problem = ckpt.verify(best)
        if problem is None:
            return best
        log(f"skipping {best}: {problem}")
    source = ckpt.latest_valid(run, log)
    if source is None:
        raise ConfigError(f"{run}: no valid weights to load (train first, or the checkpoints are corrupt)")
    return source


def load_run_model(run: Path, data: Path | None = None, weights: str = "best", log=print, source: Path | None = None):
    """(model in eval mode, config, dataset info) of a trained run, with its best (or latest) weights,
    or those of ``source`` when the caller has already chosen (and verified) the folder."""
    cfg = load_run_config(run)
    data = storage.as_root(data or cfg.data.path)
    source = source or weights_source(run, weights, log)
    model, info = build_model(cfg.model, cfg.lora, cfg.heads, data, cache=run)
    state = ckpt.read_state(source)
    if state.get("vocab_version") not in (None, info.vocab_version):
        raise ConfigError(
            f"{run} was trained on vocab {state['vocab_version']} but {data} has {info.vocab_version}; "
            f"evaluate on the run's own data or retrain"
        )
    model.load_state_dict(ckpt.load_weights(source), strict=False)
    return model.eval(), cfg, info


def evaluate_run(
    run: Path | list[Path],
    split: str = "test",
    ks: list[int] | None = None,
    exclude_seen: bool | None = None,
    log=print,
) -> dict:
    """Full-ranking metrics of the run's best weights on ``split``; several runs trained on the same
    data are scored as one ensemble (the mean of their log-probabilities)."""
    runs = [Path(run)] if isinstance(run, (str, Path)) else [Path(r) for r in run]
    loaded = [load_run_model(r, log=log) for r in runs]
    _, cfg, info = loaded[0]
    for other_run, (_, other, other_info) in zip(runs[1:], loaded[1:], strict=True):
        if other_info.vocab_version != info.vocab_version or other.model.max_len != cfg.model.max_len:
            raise ConfigError(
                f"{other_run}: an ensemble needs runs trained on the same data (vocab) with the same "
                f"model.max_len as {runs[0]}"
            )
    data = storage.as_root(cfg.data.path)
    exclude = cfg.eval.exclude_seen if exclude_seen is None else exclude_seen
    eval_cfg = dataclasses.replace(
        cfg.eval, ks=ks or cfg.eval.ks, exclude_seen=resolve_exclude_seen(exclude, data, log)
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [model.to(device) for model, _, _ in loaded]
    metrics = evaluate_model(models if len(models) > 1 else models[0], data, split, eval_cfg, cfg.model.max_len, device)
    named = str(runs[0]) if len(runs) == 1 else [str(r) for r in runs]
    return {"split": split, "run": named, "exclude_seen": eval_cfg.exclude_seen, **metrics}


def run_scorer(runs: list[Path], root, cold_items: bool = True, log=print) -> tuple[KnownItems, torch.Tensor, dict]:
    """(scorer, rankable items, facts) for trained runs (several: an ensemble) on ``root``'s
    vocabulary. ``cold_items``: rank items the runs never saw when they can encode them from text or
    attributes; otherwise (or for id-only models) such items are never recommended."""
    from trainer.retrain import grow_and_load

    lineage = {g["vocab_version"] for g in shards.load_manifest(root)["generations"]}
    models, known = [], set()
    max_len = None
    for run in runs:
        cfg = load_run_config(run)
        source = weights_source(run, log=log)
        trained_on = ckpt.read_state(source).get("vocab_version")
        if trained_on not in lineage:
            # Item ids are only stable along one dataset's generations (bgpt shard --append).
            raise ConfigError(
                f"{run} was trained on vocabulary {trained_on}, which is not a generation of {root}: "
                f"its item ids would not match; evaluate on the dataset it was trained on (or one appended to it)"
            )
        model, _ = build_model(cfg.model, cfg.lora, cfg.heads, root, cache=run)
        grow_and_load(model, source, log=lambda *a: None)
        known.add(int(ckpt.load_weights(source)["items.ids.weight"].shape[0]))
        if max_len not in (None, cfg.model.max_len):
            raise ConfigError(f"{run}: an ensemble needs runs with the same model.max_len")
        max_len = cfg.model.max_len
        models.append(model)
    if len(known) != 1:
        raise ConfigError("an ensemble needs runs trained on the same vocabulary")
    known_items = known.pop()
    readers = [m.items.text_proj is not None or m.items.attributes is not None for m in models]
    encode_cold = cold_items and all(readers)
    rankable = torch.ones(models[0].num_items, dtype=torch.bool)
    if not encode_cold:
        rankable[known_items:] = False
    facts = {"known_items": known_items, "encodes_cold_items": encode_cold, "max_len": max_len}
    return KnownItems(ModelScorer(models if len(models) > 1 else models[0]), known_items, encode_cold), rankable, facts


def evaluate_on_period(
    runs: list[Path],
    data=None,
    *,
    generation: int | None = None,
    start: str | int | None = None,
    end: str | int | None = None,
    split: str | None = None,
    ks: list[int] | None = None,
    exclude_seen: bool | str | None = None,
    baseline_kinds: list[str] | None = None,
    cold_items: bool = True,
    log=print,
) -> dict:
    """`bgpt eval --protocol next-period` and `bgpt baseline`: resolve the data (default: the first
    run's), the period (see trainer.periods.resolve_period) and ``exclude_seen`` (default: the run's
    setting, else auto), then score runs and baselines on the same events."""
    eval_cfg = EvalConfig()
    if runs:
        run_cfg = load_run_config(runs[0])
        data, eval_cfg = data or run_cfg.data.path, run_cfg.eval
    if data is None:
        raise ConfigError("give --data DIR (the dataset whose period is predicted)")
    root = storage.as_root(data)
    period = resolve_period(root, generation, start, end, split)
    decided = resolve_exclude_seen(eval_cfg.exclude_seen if exclude_seen is None else exclude_seen, root, log)
    eval_cfg = dataclasses.replace(eval_cfg, ks=ks or eval_cfg.ks, exclude_seen=decided)
    model = run_scorer(runs, root, cold_items, log) if runs else None
    result = evaluate_next_period(model, root, period, eval_cfg, baseline_kinds, log)
    return {"data": str(data), "runs": [str(r) for r in runs], **result}
