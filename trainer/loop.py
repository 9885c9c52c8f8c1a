"""The training loop: one code path for a single process and for `accelerate launch`.

Reads top to bottom: set up -> maybe resume -> for each micro batch: forward, backward, (every
``grad_accum``) clip, step, schedule -> log, validate, checkpoint -> stop on steps, epochs,
time budget or early stopping. The data stream is not passed through ``accelerator.prepare``:
each rank reads its own part of the shards (see data_sharding.stream).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data_sharding.stream import ShardDataset, StreamConfig, StreamLoader
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError
from trainer.evaluate import evaluate_model


@dataclass
class DataConfig:
    """Which shards to train on and how to read them."""

    path: str = ""
    """Dataset folder written by `bgpt shard`."""
    num_workers: int = 1
    """DataLoader worker processes per rank reading shards."""
    generations: str = "state"
    """state (every user's latest sequence), latest (the newest generation only) or a generation number."""


@dataclass
class TrainConfig:
    """Optimisation, schedule, budget and logging."""

    micro_batch_size: int = 64
    """Windows per device per forward pass."""
    grad_accum: int = 1
    """Micro batches per optimizer step; global batch = micro_batch_size x processes x grad_accum."""
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

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.schedule {self.schedule!r}: choose cosine, linear or constant")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision {self.precision!r}: choose auto, fp32 or bf16")


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


def make_accelerator(cfg: TrainConfig, run: Path):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # The process-group backend is only set when launched with several processes: accelerate
    # treats a backend as a request for a process group.
    handlers = [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo")] if distributed else []
    return Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.grad_accum,
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
        data = Path(run_cfg.data.path)
        stream_cfg = StreamConfig(
            max_len=run_cfg.model.max_len,
            batch_size=train.micro_batch_size,
            seed=train.seed,
            generations=run_cfg.data.generations,
        )
        dataset = ShardDataset(data, stream_cfg, accelerator.process_index, accelerator.num_processes)
        self.loader = StreamLoader(dataset, num_workers=run_cfg.data.num_workers)
        if len(self.loader) == 0:
            raise ConfigError(f"{data}: no training windows (every user has fewer than 2 training events)")
        steps_per_epoch = max(1, len(self.loader) // train.grad_accum)
        self.total_steps = train.max_steps or train.epochs * steps_per_epoch
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.98))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(train, self.total_steps, lambda: self.state.seconds)
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        """Every rank contributes its RNG and stream position; the main process writes."""
        rank_state = {"rng": ckpt.rng_state(), "loader": self.loader.state_dict()}
        rank_states = self.accelerator.gather_for_metrics([rank_state], use_gather_object=True)
        if self.accelerator.is_main_process:
            state = {**self.state.to_dict(), "vocab_version": self.vocab_version}
            optimizer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            weights = ckpt.trainable_state(self.accelerator.unwrap_model(self.model))
            ckpt.write_checkpoint(ckpt.step_dir(self.run, self.state.step), weights, optimizer, rank_states, state)
            ckpt.prune(self.run, self.cfg.checkpoint.keep_last)
        self.accelerator.wait_for_everyone()

    def resume(self, path: Path) -> None:
        state = ckpt.read_state(path)
        if state["vocab_version"] != self.vocab_version:
            raise ConfigError(
                f"{path}: trained on vocab {state['vocab_version']}, data has {self.vocab_version}; "
                f"use `bgpt retrain` for a new generation"
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        missing = set(ckpt.trainable_state(unwrapped)) - set(ckpt.load_weights(path))
        if missing:
            raise ConfigError(f"{path}: checkpoint lacks {sorted(missing)[:3]}...; was the model config changed?")
        unwrapped.load_state_dict(ckpt.load_weights(path), strict=False)
        saved = torch.load(path / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        rank = torch.load(path / f"rank-{self.accelerator.process_index}.pt", weights_only=False)
        ckpt.set_rng_state(rank["rng"])
        self.loader.load_state_dict(rank["loader"])
        self.state = TrainState(**{k: state[k] for k in TrainState.__dataclass_fields__})
        self.log(f"resumed from {path} at step {self.state.step}")

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> bool:
        """Validate on the main process; keep the best weights; True when patience ran out."""
        stop = False
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            metrics = evaluate_model(
                model, Path(self.cfg.data.path), "valid", self.cfg.eval, self.cfg.model.max_len, self.accelerator.device
            )
            score = metrics["ndcg@10"] if "ndcg@10" in metrics else metrics[f"ndcg@{self.cfg.eval.ks[0]}"]
            record = {"step": self.state.step, "seconds": round(self.state.seconds, 1), "tokens": self.state.tokens}
            with open(self.run / "valid_metrics.jsonl", "a") as f:
                f.write(json.dumps({**record, "valid": metrics}) + "\n")
            if score > self.state.best_metric:
                self.state.best_metric, self.state.best_step, self.state.evals_since_best = score, self.state.step, 0
                best_state = {**self.state.to_dict(), "vocab_version": self.vocab_version, "valid": metrics}
                ckpt.save_best(self.run, ckpt.trainable_state(model), best_state)
            else:
                self.state.evals_since_best += 1
            patience = self.cfg.train.patience
            stop = patience > 0 and self.state.evals_since_best >= patience
            self.log(
                f"step {self.state.step}: valid ndcg@10 {score:.4f} hr@10 {metrics.get('hr@10', 0):.4f} "
                f"(best {self.state.best_metric:.4f} at step {self.state.best_step})"
            )
        flag = torch.tensor([1.0 if stop else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        train = self.cfg.train
        acc = self.accelerator
        started = time.perf_counter() - self.state.seconds
        window_tokens, window_start = 0, time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_main_process, unit="step")
        done = self.state.step >= self.total_steps
        last_eval = self.state.step
        while not done:
            for batch in self.loader:
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.accumulate(self.model):
                    out = self.model(batch)
                    acc.backward(out["loss"])
                    if acc.sync_gradients and train.clip_grad > 0:
                        acc.clip_grad_norm_(self.model.parameters(), train.clip_grad)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window_tokens += int(out["targets"])
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.state.step += 1
                self.state.seconds = time.perf_counter() - started
                bar.update(1)
                if self.state.step % train.log_every == 0:
                    tokens = int(acc.reduce(torch.tensor(window_tokens, device=acc.device), reduction="sum"))
                    self.state.tokens += tokens
                    rate = tokens / max(1e-9, time.perf_counter() - window_start)
                    window_tokens, window_start = 0, time.perf_counter()
                    lr = self.scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{out['loss'].item():.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
                    acc.log({"loss": out["loss"].item(), "tokens_per_s": rate, "lr": lr}, step=self.state.step)
                out_of_time = train.max_minutes is not None and self.state.seconds > 60 * train.max_minutes
                done = self.state.step >= self.total_steps or out_of_time
                if (train.eval_every and self.state.step % train.eval_every == 0) or done:
                    last_eval = self.state.step
                    done = self.validate() or done
                if self.cfg.checkpoint.every_steps and self.state.step % self.cfg.checkpoint.every_steps == 0:
                    self.save()
                if done:
                    break
        self.state.tokens += int(acc.reduce(torch.tensor(window_tokens, device=acc.device), reduction="sum"))
        if last_eval != self.state.step:
            self.validate()
        self.save()
        bar.close()
        return self.state
