"""The process a run trains in: the Accelerator (precision, process group, DeepSpeed), the
learning-rate schedule, and borrowing idle cores for main-process-only work."""

from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta
from pathlib import Path

import torch

from trainer.config import TrainConfig


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


def loader_workers(configured: int | None, cuda: bool) -> int:
    """``data.num_workers``, or when None the worker count for the cores of this rank (the node's
    cores shared by its ``LOCAL_WORLD_SIZE`` ranks). On 2 CPU cores the Sports recipe trained 600
    steps in 20.7 s with the loader in process and 24.5 s with one worker (benchmarks/README.md):
    a worker only pays once the step leaves cores idle."""
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cuda:
        return max(0, min(4, cores - 1))
    return 0 if cores < 4 else min(2, cores // 4)


def uses_deepspeed() -> bool:
    """True inside a process started by `accelerate launch` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group_kwargs(cfg: TrainConfig, world_size: int, cuda: bool) -> list:
    """The process group's backend and collective timeout, only when launched with several
    processes: accelerate treats these settings as a request for a process group."""
    from accelerate.utils import InitProcessGroupKwargs

    if world_size <= 1:
        return []
    timeout = timedelta(minutes=cfg.collective_timeout_minutes)
    return [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timeout)]


def before_process_group() -> None:
    """Call before a process group is made. ``torch.distributed.nn.functional`` takes
    ``group=group.WORLD`` as a default argument of its collectives, evaluated when the module is
    first imported; imported under a live group (TorchRec imports it when a sharded item table is
    built), ten functions hold that group for good, destroy_process_group cannot free it, and its
    gloo threads outlive the run into interpreter shutdown, where one still releasing a collective's
    tensors aborts the finished process (SIGABRT, "terminate called without an active exception").
    Imported first, the defaults are None."""
    import torch.distributed.nn.functional  # noqa: F401


def make_accelerator(cfg: TrainConfig, run: Path):
    from accelerate import Accelerator

    before_process_group()
    cuda = torch.cuda.is_available()
    if cuda:
        # TF32 for what stays fp32 on GPUs (the catalogue score products, fp32 runs): 10 bits of
        # mantissa in, fp32 accumulation and output, several times fp32's speed.
        torch.set_float32_matmul_precision("high")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = uses_deepspeed()
    return Accelerator(
        # DeepSpeed runs on CPU through its own CPU accelerator, not accelerate's cpu mode.
        cpu=not cuda and not deepspeed,
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.accumulation(world_size),
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(run),
        kwargs_handlers=[*process_group_kwargs(cfg, world_size, cuda), *ddp_kwargs(world_size)],
    )


def ddp_kwargs(world_size: int) -> list:
    """DDP without broadcasting buffers before every forward: the model's buffers (item text
    vectors, attribute bags, count tables) are built from the data, identical on every rank and
    never change in training, and the item text table alone is items x 384 floats."""
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(broadcast_buffers=False)] if world_size > 1 else []


class ControlFlags:
    """The loop's yes/no questions to every rank (out of time? checkpoint due? stop now?), each
    answered "yes" when any rank says yes, all in one exchange per step. On GPUs they travel over
    a CPU (gloo) process group of their own: a flag all-reduced over NCCL is a GPU tensor, and
    reading it back makes the host wait for every kernel queued before it, each step. On CPU the
    default (gloo) group carries them."""

    def __init__(self, accelerator, timeout_minutes: float, own_group: bool | None = None) -> None:
        self.accelerator = accelerator
        self.group = None
        if own_group is None:
            own_group = accelerator.device.type != "cpu"
        if accelerator.num_processes > 1 and own_group:
            # Every rank builds its Trainer, so every rank calls this, in the same order.
            timeout = timedelta(minutes=timeout_minutes)
            self.group = torch.distributed.new_group(backend="gloo", timeout=timeout)

    def any_of(self, *flags: bool) -> list[bool]:
        if self.accelerator.num_processes == 1:
            return [bool(f) for f in flags]
        if self.group is None:
            values = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.accelerator.device)
            return (self.accelerator.reduce(values, reduction="sum") > 0).tolist()
        values = torch.tensor([1.0 if f else 0.0 for f in flags])
        torch.distributed.all_reduce(values, group=self.group)
        return (values > 0).tolist()
