"""The training loop: one code path for a single process and for `accelerate launch`.

Reads top to bottom: set up -> maybe resume -> for each micro batch: forward, backward, (every
``grad_accum``) clip, step, schedule -> log, validate, checkpoint -> stop on steps, epochs,
time budget or early stopping. The data stream is not passed through ``accelerator.prepare``:
each rank reads its own part of the shards (see data_sharding.stream).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data_sharding import shards
from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig
from trainer import checkpoint as ckpt
from trainer.config import RunConfig
from trainer.errors import ConfigError
from trainer.evaluate import WHOLE, Part, evaluate_model
from trainer.next_period import evaluate_model_on_period
from trainer.periods import newest_holdout
from trainer.run_folder import LOG_FILE, STOP_FILE, STOPPED_FILE, VALID_LOG, current_attempt, trim_logs, write_resources
from trainer.runtime import all_cores, loader_workers, lr_lambda


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

    def __init__(self, run: Path, run_cfg: RunConfig, model, vocab_version: str, accelerator, log=print) -> None:
        self.run, self.cfg, self.accelerator, self.log = run, run_cfg, accelerator, log
        self.vocab_version = vocab_version
        self.state = TrainState()
        train = run_cfg.train
        data = run_cfg.data.root
        self.holdout = newest_holdout(data) if run_cfg.data.validate_on_newest else None
        stream_cfg = run_cfg.training_stream(None if self.holdout is None else self.holdout.generation - 1)
        dataset = ShardDataset(data, stream_cfg, accelerator.process_index, accelerator.num_processes)
        # Nothing to validate on (a refit, or data without a valid split): keep the latest weights.
        valid_split = StreamConfig(split="valid", until_generation=stream_cfg.until_generation)
        self.validates = not run_cfg.data.train_on_valid and (
            self.holdout is not None or ShardDataset(data, valid_split).num_samples > 0
        )
        cuda = accelerator.device.type == "cuda"
        workers = loader_workers(run_cfg.data.num_workers, cuda)
        self.loader = StreamLoader(dataset, num_workers=workers, pin_memory=cuda)
        if len(self.loader) == 0:
            raise ConfigError(f"{data}: no training windows (every user has fewer than 2 training events)")
        self.grad_accum = train.accumulation(accelerator.num_processes)
        steps_per_epoch = max(1, len(self.loader) // self.grad_accum)
        self.total_steps = train.max_steps or train.epochs * steps_per_epoch
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel over all parameters (CPU and GPU) instead of a loop of small ones.
        optimizer = torch.optim.AdamW(
            params, lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.98), fused=True
        )
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
            f"{train.micro_batch_size * accelerator.num_processes * self.grad_accum} windows; "
            f"{workers} loader workers per process"
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
        ckpt.save_rank_state(tmp, acc.process_index, rank_state)
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
        saved_world, world = state.get("world_size", 1), self.accelerator.num_processes
        if saved_world != world and self.zero_stage is not None:
            raise ConfigError(
                f"{path}: written by {saved_world} processes under DeepSpeed, whose optimizer partitions "
                f"load only on {saved_world} (this run has {world}); resume with {saved_world} processes, "
                f"or start a new run from its weights with --train.init_from={path}"
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        weights = ckpt.load_weights(path)
        missing = {n for n, p in unwrapped.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise ConfigError(f"{path}: checkpoint lacks {sorted(missing)[:3]}...; was the model config changed?")
        saved = ckpt.load_optimizer(path)
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
                metrics = self._evaluate_valid(model, WHOLE)
        elif self.accelerator.num_processes > 1:
            # Each rank scores its share of the batches; the merged metrics equal one process's.
            metrics = self._evaluate_valid(model, Part.of(self.accelerator))
        else:
            with all_cores():
                metrics = self._evaluate_valid(model, WHOLE)
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

    def _evaluate_valid(self, model, part: Part) -> dict:
        cfg, device = self.cfg, self.accelerator.device
        if self.holdout is not None:
            return evaluate_model_on_period(
                model, cfg.data.root, self.holdout, cfg.eval, cfg.model.max_len, device, part=part
            )
        return evaluate_model(model, cfg.data.root, "valid", cfg.eval, cfg.model.max_len, device, part=part)

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
        window_tokens, window_start = self._no_tokens(), time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_main_process, unit="step")
        done = self.state.step >= self.total_steps
        last_eval = self.state.step
        step_loss = torch.zeros((), device=acc.device)
        while not done:
            for batch in self.loader:
                batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                with acc.accumulate(self.model):
                    out = self.model(batch)
                    acc.backward(out["loss"])
                    if acc.sync_gradients and train.clip_grad > 0 and self.zero_stage is None:
                        acc.clip_grad_norm_(self.model.parameters(), train.clip_grad)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window_tokens += out["targets"].detach()  # a device tensor: no host sync per micro step
                step_loss += out["loss"].detach() / self.grad_accum
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.state.step += 1
                self.state.seconds = time.perf_counter() - started
                bar.update(1)
                if self.state.step % train.log_every == 0:
                    self._log_step(step_loss, window_tokens, window_start, bar)
                    window_tokens, window_start = self._no_tokens(), time.perf_counter()
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
        self.state.tokens += self._all_ranks(window_tokens)
        if last_eval != self.state.step:
            self.validate()
        self.save()
        write_resources(self.run, self.accelerator, self.zero_stage)
        bar.close()
        return self.state

    def _no_tokens(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.long, device=self.accelerator.device)

    def _all_ranks(self, window_tokens: torch.Tensor) -> int:
        """Targets of the last window summed over every rank (one host sync per log line)."""
        return int(self.accelerator.reduce(window_tokens.detach().clone(), reduction="sum"))

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

    def _log_step(self, step_loss: torch.Tensor, window_tokens: torch.Tensor, window_start: float, bar) -> None:
        """Loss of the last optimizer step averaged over every rank and micro batch; tokens/s since the
        last log line. Written to ``train_log.jsonl`` and the progress bar (and TensorBoard)."""
        acc = self.accelerator
        loss = float(acc.reduce(step_loss.reshape(1), reduction="mean").item())
        tokens = self._all_ranks(window_tokens)
        self.state.tokens += tokens
        rate = tokens / max(1e-9, time.perf_counter() - window_start)
        lr = self.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
        acc.log({"loss": loss, "tokens_per_s": rate, "lr": lr}, step=self.state.step)
        if acc.is_main_process:
            record = {"step": self.state.step, "loss": loss, "lr": lr, "tokens_per_s": round(rate, 1)}
            with open(self.run / LOG_FILE, "a") as f:
                f.write(json.dumps({**record, "seconds": round(self.state.seconds, 2)}) + "\n")

    def _stop_on_request(self, window_tokens: torch.Tensor, saved: bool) -> None:
        """Checkpoint (unless this step was just saved) and leave the loop; the run resumes from here."""
        acc = self.accelerator
        self.state.tokens += self._all_ranks(window_tokens)
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
