"""The checkpoint side of the training loop (trainer.loop.Trainer): save, resume, best weights.

A checkpoint is a folder (trainer.checkpoint): the main process writes the weights, optimizer and
state; every rank writes its RNG and data position, under DeepSpeed its optimizer partition, and
with a sharded item table its slice of the table (trainer.sharded_run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer import sharded_run
from trainer.errors import ConfigError
from trainer.item_rows import sharded_names
from trainer.run_folder import trim_logs


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


class CheckpointMixin:
    """Needs: run, cfg, accelerator, model, optimizer, scheduler, loader, state, zero_stage, ema,
    vocab_version, log, _last_save (set by Trainer.__init__)."""

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
        ckpt.save_rank_state(tmp, acc.process_index, rank_state)
        sharded_run.save_rows(acc.unwrap_model(self.model), tmp)  # a sharded table: every rank its rows
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
            if self.ema is not None:
                optimizer["ema"] = self.ema.state_dict()
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
        saved_world, world = state.get("world_size", 1), self.accelerator.num_processes
        if saved_world != world and self.zero_stage is not None:
            raise ConfigError(
                f"{path}: written by {saved_world} processes under DeepSpeed, whose optimizer partitions "
                f"load only on {saved_world} (this run has {world}); resume with {saved_world} processes, "
                f"or start a new run from its weights with --train.init_from={path}"
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        weights = ckpt.load_weights(path, full_table=False)
        missing = {n for n, p in unwrapped.named_parameters() if p.requires_grad} - set(weights)
        missing -= sharded_names(unwrapped)  # in the checkpoint's item_rows/ (loaded below)
        if missing:
            raise ConfigError(f"{path}: checkpoint lacks {sorted(missing)[:3]}...; was the model config changed?")
        saved = ckpt.load_optimizer(path)
        if self.zero_stage is None:
            sharded_run.load_weights_into(unwrapped, path, weights)
            self.optimizer.load_state_dict(saved["optimizer"])
        else:
            if not (path / ckpt.ZERO_DIR).is_dir():
                raise ConfigError(f"{path}: not a DeepSpeed checkpoint; resume it with the strategy that wrote it")
            self.model.load_checkpoint(
                str(path / ckpt.ZERO_DIR), tag="state", load_module_strict=False, load_lr_scheduler_states=False
            )
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None and "ema" in saved:
            self.ema.load_state_dict(saved["ema"])
        elif self.ema is not None:
            self.log(f"{path} holds no weight average (train.ema_decay was off): it starts from these weights")
        self.set_row_lr()
        rank = self.accelerator.process_index
        rank_state = ckpt.load_rank_state(path, rank if rank < saved_world else 0)  # ranks step together
        if rank < saved_world:
            ckpt.set_rng_state(rank_state["rng"])
        else:  # a rank the checkpoint did not have: its own stream of dropout and negatives
            torch.manual_seed(self.cfg.train.seed * 1_000_003 + state["step"] * 7_919 + rank)
        if self.loader.load_state_dict(rank_state["loader"]):
            was = rank_state["loader"]
            self.log(
                f"elastic resume: the checkpoint's data position was reached by {was['world_size']} "
                f"processes x {was['num_workers']} loader workers, this run has {world} x "
                f"{self.loader.num_workers}; the samples of epoch {was['epoch']} not read yet are shared "
                f"out anew (none skipped or repeated), and the next epoch follows this topology"
            )
        self.state = TrainState(**{k: state[k] for k in TrainState.__dataclass_fields__})
        self.log(f"resumed from {path} at step {self.state.step}")
        if self.accelerator.is_main_process:
            dropped = trim_logs(self.run, self.state.step)
            if dropped:
                self.log(f"dropped {dropped} log records after step {self.state.step} (not in any checkpoint)")

    def set_row_lr(self) -> None:
        """A sharded table's learning rate: train.item_lr on the schedule of train.lr."""
        train = self.cfg.train
        factor = self.scheduler.get_last_lr()[0] / train.lr if train.lr else 1.0
        sharded_run.set_row_lr(self.accelerator.unwrap_model(self.model), train.item_lr * factor)

    def save_best(self, model, weights: dict | None, state: dict | None) -> None:
        """``RUN/best/``: the weights with the best validation score so far (``weights``: the main
        process's gathered ones, or None to take them from ``model``), and a sharded run's table,
        each rank its rows; atomic like a checkpoint. A collective; ``state`` on the main process."""
        acc, target = self.accelerator, self.run / "best"
        tmp = ckpt.begin_checkpoint(target) if acc.is_main_process else ckpt.temp_dir(target)
        acc.wait_for_everyone()
        sharded_run.save_rows(model, tmp)
        if acc.is_main_process:
            ckpt.finish_checkpoint(tmp, target, weights or ckpt.trainable_state(model), {}, state)
        acc.wait_for_everyone()
