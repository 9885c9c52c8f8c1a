"""A run folder: ``config.yaml``, checkpoints, ``best/``, validation log and ``metrics.json``.

``train_run`` creates or resumes a run; ``load_run_model`` rebuilds a trained model for
evaluation and prediction; ``evaluate_run`` scores a split and writes ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from data_sharding import shards, storage
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError
from trainer.evaluate import evaluate_model
from trainer.factory import build_model, parameter_counts
from trainer.loop import Trainer, all_cores, make_accelerator

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
            for stale in ("best", "valid_metrics.jsonl", "metrics.json"):
                target = run / stale
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        (run / CONFIG).write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        (run / "data_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
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
            metrics = evaluate_run(run, "test", log=log)
        metrics["train"] = {**state.to_dict(), "wall_seconds_this_process": round(time.perf_counter() - started, 1)}
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _quiet(*args, **kwargs) -> None:
    return None


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
    eval_cfg = dataclasses.replace(
        cfg.eval,
        ks=ks or cfg.eval.ks,
        exclude_seen=cfg.eval.exclude_seen if exclude_seen is None else exclude_seen,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [model.to(device) for model, _, _ in loaded]
    metrics = evaluate_model(
        models if len(models) > 1 else models[0],
        storage.as_root(cfg.data.path),
        split,
        eval_cfg,
        cfg.model.max_len,
        device,
    )
    named = str(runs[0]) if len(runs) == 1 else [str(r) for r in runs]
    return {"split": split, "run": named, "exclude_seen": eval_cfg.exclude_seen, **metrics}
