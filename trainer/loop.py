"""The training loop: one code path for a single process and for `accelerate launch`.

Reads top to bottom: set up -> maybe resume -> for each micro batch: forward, backward, (every
``grad_accum``) clip, step, schedule -> log, validate, checkpoint -> stop on steps, epochs,
time budget or early stopping. The data stream is not passed through ``accelerator.prepare``:
each rank reads its own part of the shards (see data_sharding.stream).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data_sharding import shards
from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig
from trainer import checkpoint as ckpt
from trainer import sharded_run
from trainer.config import RunConfig
from trainer.ema import WeightAverage
from trainer.errors import ConfigError
from trainer.eval_part import WHOLE, Part
from trainer.evaluate import eval_loader, evaluate_model
from trainer.item_rows import dense_parameters, prepare_for_ddp
from trainer.loop_checkpoint import CheckpointMixin, TrainState
from trainer.next_period import evaluate_model_on_period
from trainer.periods import newest_holdout
from trainer.run_folder import LOG_FILE, STOP_FILE, STOPPED_FILE, VALID_LOG, current_attempt, write_resources
from trainer.runtime import ControlFlags, all_cores, loader_workers, lr_lambda
from trainer.sharded_eval import evaluate_sharded


class Trainer(CheckpointMixin):
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
        self.flags = ControlFlags(accelerator, train.collective_timeout_minutes)
        if len(self.loader) == 0:
            raise ConfigError(f"{data}: no training windows (every user has fewer than 2 training events)")
        self.grad_accum = train.accumulation(accelerator.num_processes)
        steps_per_epoch = max(1, len(self.loader) // self.grad_accum)
        self.total_steps = train.max_steps or train.epochs * steps_per_epoch
        params = dense_parameters(model)  # a sharded item table steps its own rows (fused)
        # fused: one kernel over all parameters (CPU and GPU) instead of a loop of small ones.
        optimizer = torch.optim.AdamW(
            params, lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.98), fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(train, self.total_steps, lambda: self.state.seconds)
        )
        plugin = accelerator.state.deepspeed_plugin
        self.zero_stage = plugin.zero_stage if plugin is not None else None
        self._prepare(model, optimizer, train.seed)
        self.set_row_lr()
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

    def _prepare(self, model, optimizer, seed: int) -> None:
        """``accelerator.prepare`` (DDP leaves a sharded item table to TorchRec, which placed it),
        then each rank's own random stream: every rank was seeded alike (the same initial weights);
        from here each draws its own dropout masks and sampled negatives (rank 0 keeps the run's)."""
        placed = prepare_for_ddp(model, self.accelerator.device)
        placement = [False, True] if placed else None
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer, device_placement=placement)
        if self.accelerator.process_index > 0:
            torch.manual_seed(seed * 1_000_003 + self.accelerator.process_index)
        self.ema = None
        decay = self.cfg.train.ema_decay
        if decay > 0:
            if self.zero_stage is not None:  # (a sharded table refuses it: trainer.sharded_run.blockers)
                raise ConfigError("train.ema_decay needs DDP or one process (not DeepSpeed)")
            self.ema = WeightAverage(self.accelerator.unwrap_model(self.model), decay)

    def _averaged(self):
        """The model with the weight average swapped in (train.ema_decay), or as it is."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.swapped_in(self.accelerator.unwrap_model(self.model))

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

    def _stop_here(self) -> bool:
        """This rank's answer to "stop now?": a signal to it, or (main process) the run's stop file.
        A yes from any rank stops every rank at the same step (ControlFlags)."""
        return self.stop_requested or (self.accelerator.is_main_process and (self.run / STOP_FILE).exists())

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> bool:
        """Validate (the weight average, with train.ema_decay); keep the best weights; True when
        patience ran out."""
        with self._averaged():
            return self._validate()

    def _validate(self) -> bool:
        if not self.validates:
            return self._keep_latest()
        stop = False
        model = self.accelerator.unwrap_model(self.model)
        # ZeRO-3: parameters are partitioned and every forward gathers them collectively, so each
        # rank scores its share of the batches in step with the others (Part.collective); the
        # weights kept if this is the best validation yet are gathered by every rank too.
        weights = self.trainable_weights() if self.zero_stage == 3 else None
        metrics = None
        if self.zero_stage == 3:
            import deepspeed

            # The item table is read outside any module's forward in evaluation: gather it.
            with deepspeed.zero.GatheredParameters([model.items.ids.weight], modifier_rank=None):
                metrics = self._evaluate_valid(model, Part.of(self.accelerator, collective=True))
        elif self.accelerator.num_processes > 1:
            # Each rank scores its share of the batches; the merged metrics equal one process's.
            metrics = self._evaluate_valid(model, Part.of(self.accelerator))
        else:
            with all_cores():
                metrics = self._evaluate_valid(model, WHOLE)
        best_state = None
        if self.accelerator.is_main_process:
            stop, best_state = self._record_validation(metrics)
        stop, better = self.flags.any_of(stop, best_state is not None)
        if better:
            self.save_best(model, weights, best_state)
        return stop

    def _keep_latest(self) -> bool:
        """A refit trains on the validation events, so nothing is held out to choose by: the latest
        weights are kept as ``best/`` (what eval and predict load)."""
        weights = self.trainable_weights()
        state = {**self.state.to_dict(), "vocab_version": self.vocab_version, "refit": True}
        self.save_best(self.accelerator.unwrap_model(self.model), weights, state)
        if self.accelerator.is_main_process:
            self.log(
                f"step {self.state.step}: nothing held out to validate on (a refit, or no valid split); latest weights kept"
            )
        return False

    def _evaluate_valid(self, model, part: Part) -> dict:
        cfg, device = self.cfg, self.accelerator.device
        if sharded_run.table_of(model) is not None:
            batches = eval_loader(cfg.data.root, "valid", cfg.model.max_len, cfg.eval.batch_size)
            return evaluate_sharded(model, batches, cfg.eval, device, part)
        if self.holdout is not None:
            return evaluate_model_on_period(
                model, cfg.data.root, self.holdout, cfg.eval, cfg.model.max_len, device, part=part
            )
        return evaluate_model(model, cfg.data.root, "valid", cfg.eval, cfg.model.max_len, device, part=part)

    def _record_validation(self, metrics: dict) -> tuple[bool, dict | None]:
        """Log the validation metrics (main process): (patience ran out, the state to keep in
        ``best/`` when these weights are the best yet, else None)."""
        score = metrics["ndcg@10"] if "ndcg@10" in metrics else metrics[f"ndcg@{self.cfg.eval.ks[0]}"]
        record = {"step": self.state.step, "seconds": round(self.state.seconds, 1), "tokens": self.state.tokens}
        with open(self.run / VALID_LOG, "a") as f:
            f.write(json.dumps({**record, "valid": metrics}) + "\n")
        best_state = None
        if score > self.state.best_metric:
            self.state.best_metric, self.state.best_step, self.state.evals_since_best = score, self.state.step, 0
            best_state = {**self.state.to_dict(), "vocab_version": self.vocab_version, "valid": metrics}
        else:
            self.state.evals_since_best += 1
        patience = self.cfg.train.patience
        self.log(
            f"step {self.state.step}: valid ndcg@10 {score:.4f} hr@10 {metrics.get('hr@10', 0):.4f} "
            f"(best {self.state.best_metric:.4f} at step {self.state.best_step})"
        )
        return patience > 0 and self.state.evals_since_best >= patience, best_state

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
                if self.ema is not None:
                    self.ema.update(acc.unwrap_model(self.model))
                self.scheduler.step()
                self.set_row_lr()
                self.state.step += 1
                self.state.seconds = time.perf_counter() - started
                bar.update(1)
                if self.state.step % train.log_every == 0:
                    self._log_step(step_loss, window_tokens, window_start, bar)
                    window_tokens, window_start = self._no_tokens(), time.perf_counter()
                step_loss = torch.zeros((), device=acc.device)
                out_of_time, saved, stop = self._step_flags()
                done = self.state.step >= self.total_steps or out_of_time
                if (train.eval_every and self.state.step % train.eval_every == 0) or done:
                    last_eval = self.state.step
                    done = self.validate() or done
                if saved:
                    self.save()
                if not done and stop:
                    self._stop_on_request(window_tokens, saved)
                    self.loader.close()
                    bar.close()
                    return self.state
                if done:
                    break
        self.loader.close()  # its persistent workers are done
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

    def _step_flags(self) -> list[bool]:
        """(out of time, checkpoint due, stop requested) as every rank agrees, in one exchange
        (each rank's own clock could disagree on the time budget)."""
        train, every = self.cfg.train, self.cfg.checkpoint.every_steps
        out_of_time, late, stop = self.flags.any_of(
            train.max_minutes is not None and self.state.seconds > 60 * train.max_minutes,
            self._save_late(),
            self._stop_here(),
        )
        return [out_of_time, late or (bool(every) and self.state.step % every == 0), stop]

    def _save_late(self) -> bool:
        """``checkpoint.every_minutes`` have passed since the last save, by the main process's clock
        (so every rank saves at the same step)."""
        every = self.cfg.checkpoint.every_minutes
        late = bool(every) and time.perf_counter() - self._last_save > 60 * every
        return late and self.accelerator.is_main_process

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
