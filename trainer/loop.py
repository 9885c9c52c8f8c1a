"""The training loop: one code path for a single process and for `accelerate launch`.

Reads top to bottom: set up -> maybe resume -> for each micro batch: forward, backward, (every
``grad_accum``) clip, step, schedule -> log, validate, checkpoint -> stop on steps, epochs,
time budget or early stopping. The data stream is not passed through ``accelerator.prepare``:
each rank reads its own part of the shards (see data_sharding.stream).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data_sharding import shards, storage
from data_sharding.stream import ShardDataset, StreamConfig, StreamLoader
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError
from trainer.evaluate import evaluate_model
from trainer.next_period import evaluate_model_on_period
from trainer.periods import Period

STOP_FILE = "STOP"
"""Created in a run folder (e.g. by the Slurm script on its preemption signal): checkpoint and exit.
Empty, it stops whichever attempt reads it; holding an attempt id (:func:`current_attempt`), only
that attempt, so a request left behind by a killed job never stops the requeued one."""
STOPPED_FILE = "STOPPED"
"""Written when a run stopped on request with a checkpoint: {"step", "checkpoint", "attempt"}."""
EXIT_STOPPED = 75
"""Exit status of `bgpt train`/`retrain`/`launch` that stopped with a checkpoint (EX_TEMPFAIL):
run the same command to resume. 0: finished (metrics.json written); 1: failed; 2: bad input."""
LOG_FILE = "train_log.jsonl"
VALID_LOG = "valid_metrics.jsonl"


def current_attempt() -> str:
    """This attempt of a Slurm job ("JOBID.RESTARTS"), or "" outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT') or 0}" if job else ""


def stopped_marker(run: Path) -> dict | None:
    """What the run's last stop on request left (None when the run did not stop that way)."""
    try:
        return json.loads((Path(run) / STOPPED_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def trim_logs(run: Path, step: int) -> int:
    """Drop log records after ``step``: they belong to an attempt that died before its next
    checkpoint, and the resumed run logs those steps again. Each step is then logged once across
    restarts. Returns how many records were dropped (a half-written last line counts)."""
    dropped = 0
    for name in (LOG_FILE, VALID_LOG):
        path = Path(run) / name
        if not path.exists():
            continue
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass
        if len(keep) < len(lines):
            dropped += len(lines) - len(keep)
            shards.write_atomic(path, "".join(line + "\n" for line in keep).encode())
    return dropped


def request_stop(run: Path, attempt: str) -> None:
    """Ask the run to checkpoint and stop: ``RUN/STOP`` addressed to ``attempt`` ("" for any)."""
    (Path(run) / STOP_FILE).write_text(attempt + "\n")


@dataclass
class DataConfig:
    """Which shards to train on and how to read them."""

    path: str = ""
    """Dataset folder written by `bgpt shard`."""
    num_workers: int = 1
    """DataLoader worker processes per rank reading shards."""
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


def newest_holdout(data) -> Period:
    """The period that data.validate_on_newest holds out: the newest generation (there must be an
    earlier one to train on)."""
    from data_sharding import shards

    latest = int(shards.load_manifest(data)["generation"])
    if latest < 2:
        raise ConfigError(
            f"data.validate_on_newest: {data} has one generation; add the newest events with `bgpt shard --append`"
        )
    return Period(generation=latest)


def lr_lambda(cfg: TrainConfig, total_steps: int, elapsed=lambda: 0.0):
    """Warmup, then decay over whichever budget runs out first: steps or ``max_minutes``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.max_minutes:
            progress = max(progress, min(1.0, elapsed() / (60 * cfg.max_minutes)))
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


@contextlib.contextmanager
def all_cores():
    """Main-process-only work on CPU (validation) while the other ranks wait: torchrun gives each
    process one thread, so borrow the idle cores for the duration."""
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(before, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def uses_deepspeed() -> bool:
    """True inside a process started by `accelerate launch` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: TrainConfig, run: Path):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # The process-group backend is only set when launched with several processes: accelerate
    # treats a backend as a request for a process group.
    handlers = [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo")] if world_size > 1 else []
    deepspeed = uses_deepspeed()
    return Accelerator(
        # DeepSpeed runs on CPU through its own CPU accelerator, not accelerate's cpu mode.
        cpu=not cuda and not deepspeed,
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.accumulation(world_size),
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(run),
        kwargs_handlers=handlers,
    )


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_metric: float = -1.0
    best_step: int = 0
    evals_since_best: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Trainer:
    """Owns the model, optimizer, data stream and run folder of one training run."""

    def __init__(self, run: Path, run_cfg, model, vocab_version: str, accelerator, log=print) -> None:
        self.run, self.cfg, self.accelerator, self.log = run, run_cfg, accelerator, log
        self.vocab_version = vocab_version
        self.state = TrainState()
        train = run_cfg.train
        data = storage.as_root(run_cfg.data.path)
        self.holdout = newest_holdout(data) if run_cfg.data.validate_on_newest else None
        stream_cfg = StreamConfig(
            max_len=run_cfg.model.max_len,
            batch_size=train.micro_batch_size,
            seed=train.seed,
            generations=run_cfg.data.generations,
            focus_new=run_cfg.data.focus_new,
            replay_fraction=run_cfg.data.replay_fraction if run_cfg.data.focus_new else 0.0,
            include_valid=run_cfg.data.train_on_valid,
            until_generation=None if self.holdout is None else self.holdout.generation - 1,
        )
        dataset = ShardDataset(data, stream_cfg, accelerator.process_index, accelerator.num_processes)
        # Nothing to validate on (a refit, or data without a valid split): keep the latest weights.
        valid_split = StreamConfig(split="valid", until_generation=stream_cfg.until_generation)
        self.validates = not run_cfg.data.train_on_valid and (
            self.holdout is not None or ShardDataset(data, valid_split).num_samples > 0
        )
        self.loader = StreamLoader(dataset, num_workers=run_cfg.data.num_workers)
        if len(self.loader) == 0:
            raise ConfigError(f"{data}: no training windows (every user has fewer than 2 training events)")
        self.grad_accum = train.accumulation(accelerator.num_processes)
        steps_per_epoch = max(1, len(self.loader) // self.grad_accum)
        self.total_steps = train.max_steps or train.epochs * steps_per_epoch
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.98))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(train, self.total_steps, lambda: self.state.seconds)
        )
        plugin = accelerator.state.deepspeed_plugin
        self.zero_stage = plugin.zero_stage if plugin is not None else None
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if self.zero_stage == 3:
            import deepspeed

            # The item table is read outside its own module's forward (tied output scores):
            # ZeRO-3 must gather it for the whole model's forward and backward.
            unwrapped = accelerator.unwrap_model(self.model)
            deepspeed.zero.register_external_parameter(unwrapped, unwrapped.items.ids.weight)
        strategy = "single process" if accelerator.num_processes == 1 else "ddp"
        if self.zero_stage is not None:
            strategy = f"deepspeed zero-{self.zero_stage}"
        self.log(
            f"world size {accelerator.num_processes} ({strategy}); global batch "
            f"{train.micro_batch_size} x {accelerator.num_processes} x {self.grad_accum} = "
            f"{train.micro_batch_size * accelerator.num_processes * self.grad_accum} windows"
        )
        self.stop_requested = False
        self.preempted = False
        self._last_save = time.perf_counter()
        self.attempt = current_attempt()
        if accelerator.is_main_process:
            self._clear_stale_stop()
        self._install_signal_handlers()

    # -- checkpoints ----------------------------------------------------------------------------
    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on the main process (ZeRO-3 shards are gathered; collective)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.zero_stage != 3:
            return ckpt.trainable_state(unwrapped)
        full = self.accelerator.get_state_dict(self.model)
        names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
        return {n: full[n].contiguous() for n in names} if self.accelerator.is_main_process else {}

    def save(self) -> None:
        """Every rank contributes its RNG and stream position (and, under DeepSpeed, its optimizer
        partition); the main process writes the rest and publishes the folder atomically."""
        acc = self.accelerator
        target = ckpt.step_dir(self.run, self.state.step)
        tmp = ckpt.begin_checkpoint(target) if acc.is_main_process else ckpt.temp_dir(target)
        acc.wait_for_everyone()
        rank_state = {"rng": ckpt.rng_state(), "loader": self.loader.state_dict()}
        torch.save(rank_state, tmp / f"rank-{acc.process_index}.pt")
        if self.zero_stage is not None:
            # Sharded optimizer states: each rank writes its own partition (frozen base excluded).
            self.model.save_checkpoint(str(tmp / ckpt.ZERO_DIR), tag="state", exclude_frozen_parameters=True)
        weights = self.trainable_weights()
        acc.wait_for_everyone()
        self._last_save = time.perf_counter()
        if acc.is_main_process:
            state = {**self.state.to_dict(), "vocab_version": self.vocab_version, "world_size": acc.num_processes}
            optimizer = {"scheduler": self.scheduler.state_dict()}
            if self.zero_stage is None:
                optimizer["optimizer"] = self.optimizer.state_dict()
            ckpt.finish_checkpoint(tmp, target, weights, optimizer, state)
            ckpt.prune(self.run, self.cfg.checkpoint.keep_last)
        acc.wait_for_everyone()

    def resume(self, path: Path) -> None:
        state = ckpt.read_state(path)
        if state["vocab_version"] != self.vocab_version:
            raise ConfigError(
                f"{path}: trained on vocab {state['vocab_version']}, data has {self.vocab_version}; "
                f"use `bgpt retrain` for a new generation"
            )
        saved_world = state.get("world_size", 1)
        if saved_world != self.accelerator.num_processes:
            raise ConfigError(
                f"{path}: written by {saved_world} processes, this run has {self.accelerator.num_processes}; "
                f"exact resume needs the same world size (the weights alone load anywhere: bgpt eval/predict)"
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        weights = ckpt.load_weights(path)
        missing = {n for n, p in unwrapped.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise ConfigError(f"{path}: checkpoint lacks {sorted(missing)[:3]}...; was the model config changed?")
        saved = torch.load(path / "optimizer.pt", weights_only=False)
        if self.zero_stage is None:
            unwrapped.load_state_dict(weights, strict=False)
            self.optimizer.load_state_dict(saved["optimizer"])
        else:
            if not (path / ckpt.ZERO_DIR).is_dir():
                raise ConfigError(f"{path}: not a DeepSpeed checkpoint; resume it with the strategy that wrote it")
            self.model.load_checkpoint(
                str(path / ckpt.ZERO_DIR), tag="state", load_module_strict=False, load_lr_scheduler_states=False
            )
        self.scheduler.load_state_dict(saved["scheduler"])
        rank = torch.load(path / f"rank-{self.accelerator.process_index}.pt", weights_only=False)
        ckpt.set_rng_state(rank["rng"])
        self.loader.load_state_dict(rank["loader"])
        self.state = TrainState(**{k: state[k] for k in TrainState.__dataclass_fields__})
        self.log(f"resumed from {path} at step {self.state.step}")
        if self.accelerator.is_main_process:
            dropped = trim_logs(self.run, self.state.step)
            if dropped:
                self.log(f"dropped {dropped} log records after step {self.state.step} (not in any checkpoint)")

    # -- stop requests (preemption) -------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        """SIGUSR1 / SIGTERM (Slurm's preemption warning, `kill`) ask for a checkpoint and a clean exit."""
        if threading.current_thread() is not threading.main_thread():
            return

        def request(signum, frame) -> None:
            self.stop_requested = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request)

    def _clear_stale_stop(self) -> None:
        """A new attempt: forget the last one's STOPPED, and a STOP addressed to another attempt."""
        (self.run / STOPPED_FILE).unlink(missing_ok=True)
        stop = self.run / STOP_FILE
        try:
            owner = stop.read_text().strip()
        except FileNotFoundError:
            return
        if owner and owner != self.attempt:
            stop.unlink(missing_ok=True)
            self.log(f"ignored {stop}: a stop request of attempt {owner}, not of this one ({self.attempt or 'no job'})")

    def _stop_now(self) -> bool:
        """A signal to any rank, or the run's stop file, stops every rank at the same step."""
        local = self.stop_requested or (self.accelerator.is_main_process and (self.run / STOP_FILE).exists())
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> bool:
        """Validate on the main process; keep the best weights; True when patience ran out."""
        if not self.validates:
            return self._keep_latest()
        stop = False
        model = self.accelerator.unwrap_model(self.model)
        # ZeRO-3: parameters are partitioned, so every rank runs the (identical) evaluation and
        # the forward passes gather them collectively; the weights kept if this is the best
        # validation yet are gathered by every rank too.
        weights = self.trainable_weights() if self.zero_stage == 3 else None
        metrics = None
        if self.zero_stage == 3:
            import deepspeed

            # The item table is read outside any module's forward in evaluation: gather it.
            with deepspeed.zero.GatheredParameters([model.items.ids.weight], modifier_rank=None):
                metrics = self._evaluate_valid(model)
        elif self.accelerator.is_main_process:
            with all_cores():
                metrics = self._evaluate_valid(model)
        if self.accelerator.is_main_process:
            stop = self._record_validation(model, metrics, weights)
        flag = torch.tensor([1.0 if stop else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _keep_latest(self) -> bool:
        """A refit trains on the validation events, so nothing is held out to choose by: the latest
        weights are kept as ``best/`` (what eval and predict load)."""
        weights = self.trainable_weights()
        if self.accelerator.is_main_process:
            state = {**self.state.to_dict(), "vocab_version": self.vocab_version, "refit": True}
            ckpt.save_best(self.run, weights, state)
            self.log(
                f"step {self.state.step}: nothing held out to validate on (a refit, or no valid split); latest weights kept"
            )
        return False

    def _evaluate_valid(self, model) -> dict:
        cfg = self.cfg
        if self.holdout is not None:
            return evaluate_model_on_period(
                model,
                storage.as_root(cfg.data.path),
                self.holdout,
                cfg.eval,
                cfg.model.max_len,
                self.accelerator.device,
            )
        return evaluate_model(
            model, storage.as_root(cfg.data.path), "valid", cfg.eval, cfg.model.max_len, self.accelerator.device
        )

    def _record_validation(self, model, metrics: dict, weights: dict | None) -> bool:
        """Log the validation metrics, keep the best weights; True when patience ran out."""
        score = metrics["ndcg@10"] if "ndcg@10" in metrics else metrics[f"ndcg@{self.cfg.eval.ks[0]}"]
        record = {"step": self.state.step, "seconds": round(self.state.seconds, 1), "tokens": self.state.tokens}
        with open(self.run / VALID_LOG, "a") as f:
            f.write(json.dumps({**record, "valid": metrics}) + "\n")
        if score > self.state.best_metric:
            self.state.best_metric, self.state.best_step, self.state.evals_since_best = score, self.state.step, 0
            best_state = {**self.state.to_dict(), "vocab_version": self.vocab_version, "valid": metrics}
            ckpt.save_best(self.run, weights if weights is not None else ckpt.trainable_state(model), best_state)
        else:
            self.state.evals_since_best += 1
        patience = self.cfg.train.patience
        self.log(
            f"step {self.state.step}: valid ndcg@10 {score:.4f} hr@10 {metrics.get('hr@10', 0):.4f} "
            f"(best {self.state.best_metric:.4f} at step {self.state.best_step})"
        )
        return patience > 0 and self.state.evals_since_best >= patience

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        train = self.cfg.train
        acc = self.accelerator
        started = time.perf_counter() - self.state.seconds
        window_tokens, window_start = 0, time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_main_process, unit="step")
        done = self.state.step >= self.total_steps
        last_eval = self.state.step
        step_loss = torch.zeros((), device=acc.device)
        while not done:
            for batch in self.loader:
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.accumulate(self.model):
                    out = self.model(batch)
                    acc.backward(out["loss"])
                    if acc.sync_gradients and train.clip_grad > 0 and self.zero_stage is None:
                        acc.clip_grad_norm_(self.model.parameters(), train.clip_grad)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window_tokens += int(out["targets"])
                step_loss += out["loss"].detach() / self.grad_accum
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.state.step += 1
                self.state.seconds = time.perf_counter() - started
                bar.update(1)
                if self.state.step % train.log_every == 0:
                    self._log_step(step_loss, window_tokens, window_start, bar)
                    window_tokens, window_start = 0, time.perf_counter()
                step_loss = torch.zeros((), device=acc.device)
                out_of_time = train.max_minutes is not None and self.state.seconds > 60 * train.max_minutes
                done = self.state.step >= self.total_steps or out_of_time
                if (train.eval_every and self.state.step % train.eval_every == 0) or done:
                    last_eval = self.state.step
                    done = self.validate() or done
                saved = self._checkpoint_due()
                if saved:
                    self.save()
                if not done and self._stop_now():
                    self._stop_on_request(window_tokens, saved)
                    bar.close()
                    return self.state
                if done:
                    break
        self.state.tokens += int(acc.reduce(torch.tensor(window_tokens, device=acc.device), reduction="sum"))
        if last_eval != self.state.step:
            self.validate()
        self.save()
        self._write_resources()
        bar.close()
        return self.state

    def _write_resources(self) -> None:
        """``RUN/resources.json``: peak memory of every rank (process RSS; GPU memory on CUDA)."""
        from accelerate.utils import gather_object

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        ranks = gather_object([{"rank": self.accelerator.process_index, "peak_rss_gib": rss, "peak_gpu_gib": gpu}])
        if self.accelerator.is_main_process:
            strategy = f"zero{self.zero_stage}" if self.zero_stage is not None else "ddp"
            record = {"world_size": self.accelerator.num_processes, "strategy": strategy, "ranks": ranks}
            (self.run / "resources.json").write_text(json.dumps(record, indent=2) + "\n")

    def _checkpoint_due(self) -> bool:
        """Every ``every_steps`` steps, or ``every_minutes`` after the last save (the main process's
        clock decides, so every rank saves at the same step)."""
        every = self.cfg.checkpoint
        due = bool(every.every_steps) and self.state.step % every.every_steps == 0
        if every.every_minutes and not due:
            late = time.perf_counter() - self._last_save > 60 * every.every_minutes
            flag = torch.tensor(
                [1.0 if late and self.accelerator.is_main_process else 0.0], device=self.accelerator.device
            )
            due = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return due

    def _log_step(self, step_loss: torch.Tensor, window_tokens: int, window_start: float, bar) -> None:
        """Loss of the last optimizer step averaged over every rank and micro batch; tokens/s since the
        last log line. Written to ``train_log.jsonl`` and the progress bar (and TensorBoard)."""
        acc = self.accelerator
        loss = float(acc.reduce(step_loss.reshape(1), reduction="mean").item())
        tokens = int(acc.reduce(torch.tensor(window_tokens, device=acc.device), reduction="sum"))
        self.state.tokens += tokens
        rate = tokens / max(1e-9, time.perf_counter() - window_start)
        lr = self.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
        acc.log({"loss": loss, "tokens_per_s": rate, "lr": lr}, step=self.state.step)
        if acc.is_main_process:
            record = {"step": self.state.step, "loss": loss, "lr": lr, "tokens_per_s": round(rate, 1)}
            with open(self.run / LOG_FILE, "a") as f:
                f.write(json.dumps({**record, "seconds": round(self.state.seconds, 2)}) + "\n")

    def _stop_on_request(self, window_tokens: int, saved: bool) -> None:
        """Checkpoint (unless this step was just saved) and leave the loop; the run resumes from here."""
        acc = self.accelerator
        self.state.tokens += int(acc.reduce(torch.tensor(window_tokens, device=acc.device), reduction="sum"))
        if not saved:
            self.save()
        if acc.is_main_process:
            (self.run / STOP_FILE).unlink(missing_ok=True)
            marker = {"step": self.state.step, "checkpoint": str(ckpt.step_dir(self.run, self.state.step))}
            shards.write_atomic(
                self.run / STOPPED_FILE, (json.dumps({**marker, "attempt": self.attempt}) + "\n").encode()
            )
        acc.wait_for_everyone()  # every rank exits after the marker exists (launchers read it)
        self.preempted = True
        self.log(f"stop requested: checkpoint at step {self.state.step} saved; resume with the same command")
