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

from data_sharding import shards, storage
from data_sharding.stream import ShardDataset, StreamConfig
from trainer import checkpoint as ckpt
from trainer.config import CONFIG, RunConfig, check_compatible, load_run_config
from trainer.errors import ConfigError
from trainer.eval_part import WHOLE, Part
from trainer.evaluate import EvalConfig, evaluate_model, resolve_exclude_seen
from trainer.factory import build_model, mark_cold_items, parameter_counts
from trainer.loop import Trainer
from trainer.next_period import KnownItems, ModelScorer, evaluate_next_period
from trainer.periods import resolve_period
from trainer.priors import PAIRS_FILE, count_pairs, save_pairs
from trainer.run_folder import LOG_FILE, METRICS, STOPPED_FILE, VALID_LOG
from trainer.runtime import all_cores, make_accelerator
from trainer.sharded_run import grow_and_load as grow_sharded
from trainer.sharded_run import release_process_group, sharded_test, table_of, use_sharded_table
from trainer.trend_prior import EVENTS_FILE, item_events, save_events

DATA_MANIFEST = "data_manifest.json"
"""The manifest of the data a run trained on, as it stood (written when training starts)."""


def train_run(run: Path, cfg: RunConfig, log=print) -> dict:
    """Train (or resume) the run in ``run``; return the test metrics of the best validated weights."""
    try:
        return _train_run(run, cfg, log)
    finally:
        release_process_group()  # a one-process sharded run's own group


def _train_run(run: Path, cfg: RunConfig, log) -> dict:
    accelerator = make_accelerator(cfg.train, run)
    main_log = log if accelerator.is_main_process else _quiet
    if cfg.eval.exclude_seen == "auto":  # decided once, from the data, and recorded in config.yaml
        cfg.eval.exclude_seen = resolve_exclude_seen("auto", cfg.data.root, main_log)
    resume_from = _resume_point(run, cfg, log)
    if accelerator.is_main_process:
        _prepare_run_folder(run, cfg, resumed=resume_from is not None)
    accelerator.wait_for_everyone()

    torch.manual_seed(cfg.train.seed)
    num_items = int(shards.load_manifest(cfg.data.root)["vocab"]["num_items"])
    deepspeed = accelerator.state.deepspeed_plugin is not None
    accumulation = cfg.train.accumulation(accelerator.num_processes)
    sharded = use_sharded_table(cfg, num_items, accumulation, deepspeed, main_log)
    model, info = _build_run_model(run, cfg, cfg.data.root, sharded)
    if resume_from is None and cfg.train.init_from:
        source = Path(cfg.train.init_from)
        problem = ckpt.verify(source)
        if problem:
            raise ConfigError(f"train.init_from {source}: {problem}")
        (grow_sharded if sharded else ckpt.grow_and_load)(model, source, main_log)
    if cfg.train.compile:
        model.backbone.compile(dynamic=True)  # in place: parameter names (checkpoints) unchanged
    trainable, total = parameter_counts(model)
    main_log(f"model: {trainable:,} trainable of {total:,} parameters; {info.num_items:,} item ids")
    if info.text_report:
        main_log(info.text_report)
    if cfg.train.tensorboard:
        accelerator.init_trackers("bgpt")
    trainer = Trainer(run, cfg, model, info.vocab_version, accelerator, main_log)
    if resume_from is not None:
        trainer.resume(resume_from)
    started = time.perf_counter()
    state = trainer.fit()
    if trainer.preempted:
        accelerator.end_training()  # also closes the process group
        return {"stopped_at_step": state.step, "resume": "run the same command again"}
    metrics = _finish(run, cfg, trainer, log, time.perf_counter() - started)
    accelerator.end_training()
    return metrics


def _resume_point(run: Path, cfg: RunConfig, log) -> Path | None:
    """The checkpoint this request continues from (checkpoint.resume), checked against the run's
    network; None for a fresh start."""
    resume_from = None
    if cfg.checkpoint.resume == "auto" and (run / CONFIG).exists():
        resume_from = ckpt.latest_valid(run, log)
    elif cfg.checkpoint.resume not in ("auto", "none"):
        resume_from = Path(cfg.checkpoint.resume)
        problem = ckpt.verify(resume_from)
        if problem:
            raise ConfigError(f"cannot resume from {resume_from}: {problem}")
    if resume_from is not None:
        check_compatible(run, cfg)
    return resume_from


def _prepare_run_folder(run: Path, cfg: RunConfig, resumed: bool) -> None:
    """Main process: a fresh start clears what an earlier run left; every request drops
    metrics.json (it proves that this request finished, once it has) and records its config,
    the data manifest and, for the transition prior, the pair counts of its training events."""
    manifest = shards.load_manifest(cfg.data.root)
    run.mkdir(parents=True, exist_ok=True)
    if not resumed:
        for stale in ("best", VALID_LOG, LOG_FILE, STOPPED_FILE):
            target = run / stale
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (run / METRICS).unlink(missing_ok=True)
    cfg.save(run)
    shards.write_atomic(run / DATA_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    if cfg.model.transition_prior and (not resumed or not (run / PAIRS_FILE).exists()):
        _count_training_pairs(run, cfg, manifest)
    if cfg.model.trend_prior and (not resumed or not (run / EVENTS_FILE).exists()):
        holdout = int(manifest["generation"]) - 1 if cfg.data.validate_on_newest else None
        save_events(run / EVENTS_FILE, item_events(cfg.data.root, holdout, cfg.data.train_on_valid))


def _finish(run: Path, cfg: RunConfig, trainer: Trainer, log, seconds: float) -> dict:
    """The final test of the best weights and ``metrics.json`` (main process), written last. With
    several processes each scores its share of the test batches (trainer.evaluate.Part)."""
    acc = trainer.accelerator
    if trainer.zero_stage == 3:
        # Training is over: the test model below is built in each process on its own, so
        # transformers must not partition it with deepspeed.zero.Init (a collective).
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if acc.num_processes > 1:
        metrics = _final_metrics(run, cfg, trainer, log if acc.is_main_process else _quiet, Part.of(acc))
    else:
        with all_cores():
            metrics = _final_metrics(run, cfg, trainer, log, WHOLE)
    if acc.is_main_process:
        metrics["train"] = {**trainer.state.to_dict(), "wall_seconds_this_process": round(seconds, 1)}
        (run / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    acc.wait_for_everyone()
    return metrics if acc.is_main_process else {}


def _count_training_pairs(run: Path, cfg: RunConfig, manifest: dict) -> None:
    """The transition prior's counts, from exactly the events this run trains on."""
    holdout = int(manifest["generation"]) - 1 if cfg.data.validate_on_newest else None
    model = cfg.model
    num_items = int(manifest["vocab"]["num_items"])
    pairs = count_pairs(
        cfg.data.root, num_items, model.transition_neighbors, model.transition_steps, holdout, cfg.data.train_on_valid,
        timed=model.transition_causal,
    )  # fmt: skip
    save_pairs(run / PAIRS_FILE, pairs)


def _final_metrics(run: Path, cfg: RunConfig, trainer: Trainer, log, part: Part) -> dict:
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
    test = ShardDataset(cfg.data.root, StreamConfig(split="test"))
    if test.num_samples == 0:
        log("no test split in the data: evaluate with `bgpt eval --protocol next-period` on the next generation")
        return {"split": "test", "count": 0}
    model = trainer.accelerator.unwrap_model(trainer.model)
    if table_of(model) is not None:  # the best weights into the trained model; ranked by slices
        return sharded_test(model, run, cfg, part, trainer.accelerator.device)
    return evaluate_run(run, "test", log=log, part=part, device=trainer.accelerator.device)


def _build_run_model(run: Path, cfg: RunConfig, data, sharded: bool = False):
    """(model, dataset info) of ``run``'s architecture on ``data``'s vocabulary (untrained weights),
    with the ids the run never trained marked (trainer.factory.mark_cold_items, from the data
    manifest the run recorded when it trained). ``sharded``: its item rows in a sharded table (the
    training processes of a run that uses one; every other reader of a run is one process with
    the dense table)."""
    heads = dataclasses.replace(cfg.heads, sync_free=cfg.sync_free_step(torch.cuda.is_available()))
    model, info = build_model(cfg.model, cfg.lora, heads, data, cache=run, sharded=sharded)
    recorded = run / DATA_MANIFEST
    if recorded.exists():
        mark_cold_items(model, json.loads(recorded.read_text()), cfg.data.validate_on_newest)
    return model, info


def _quiet(*args, **kwargs) -> None:
    return None


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
    model, info = _build_run_model(run, cfg, data)
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
    save: bool = False,
    log=print,
    part: Part = WHOLE,
    device: torch.device | None = None,
) -> dict:
    """Full-ranking metrics of the run's best weights on ``split``; several runs trained on the same
    data are scored as one ensemble (the mean of their log-probabilities). ``save``: also write them
    into the run (``metrics.json``, or ``metrics_exclude_seen.json`` / ``metrics_with_seen.json``
    when ``exclude_seen`` overrides the run's setting); an ensemble's belong to no single run.
    ``part``: this process's share of the batches, merged with the others' (distributed)."""
    runs = [Path(run)] if isinstance(run, (str, Path)) else [Path(r) for r in run]
    loaded = [load_run_model(r, log=log) for r in runs]
    _, cfg, info = loaded[0]
    for other_run, (_, other, other_info) in zip(runs[1:], loaded[1:], strict=True):
        if other_info.vocab_version != info.vocab_version or other.model.max_len != cfg.model.max_len:
            raise ConfigError(
                f"{other_run}: an ensemble needs runs trained on the same data (vocab) with the same "
                f"model.max_len as {runs[0]}"
            )
    data = cfg.data.root
    exclude = cfg.eval.exclude_seen if exclude_seen is None else exclude_seen
    eval_cfg = dataclasses.replace(
        cfg.eval, ks=ks or cfg.eval.ks, exclude_seen=resolve_exclude_seen(exclude, data, log)
    )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [model.to(device) for model, _, _ in loaded]
    scored = models if len(models) > 1 else models[0]
    metrics = evaluate_model(scored, data, split, eval_cfg, cfg.model.max_len, device, part=part)
    named = str(runs[0]) if len(runs) == 1 else [str(r) for r in runs]
    result = {"split": split, "run": named, "exclude_seen": eval_cfg.exclude_seen, **metrics}
    if save and len(runs) == 1:
        name = {None: METRICS, True: "metrics_exclude_seen.json", False: "metrics_with_seen.json"}.get(
            exclude_seen, METRICS
        )
        (runs[0] / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_scorer(runs: list[Path], root, cold_items: bool = True, log=print) -> tuple[KnownItems, torch.Tensor, dict]:
    """(scorer, rankable items, facts) for trained runs (several: an ensemble) on ``root``'s
    vocabulary. ``cold_items``: rank items the runs never saw when they can encode them from text or
    attributes; otherwise (or for id-only models) such items are never recommended."""
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
        model, _ = _build_run_model(run, cfg, root)
        ckpt.grow_and_load(model, source, log=_quiet)
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
    online_counts: bool | None = None,
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
    online = eval_cfg.online_counts if online_counts is None else online_counts
    eval_cfg = dataclasses.replace(eval_cfg, ks=ks or eval_cfg.ks, exclude_seen=decided, online_counts=online)
    model = run_scorer(runs, root, cold_items, log) if runs else None
    result = evaluate_next_period(model, root, period, eval_cfg, baseline_kinds, log)
    return {"data": str(data), "runs": [str(r) for r in runs], **result}
