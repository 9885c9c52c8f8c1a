"""What model.time_bias costs a server: one cached recommend, one appended event and one cold start,
for two runs that differ only in the flag, side by side in one process (1 thread).

    python benchmarks/time_bias_serve.py --plain RUN --biased RUN [--users 200] [--repeats 5]

A time-bias model reads the time of the request in every layer, so its cache holds a window's
events but the last, and a recommend sends that event through the backbone (one position); a plain
model scores its cached state directly. Each operation is timed on the same users' latest windows
(the runs' own data, up to max_len events), the two models alternating per user: a recommend is
the scored state plus top-10 at a request time one hour after the last event (count priors
included), an append is one more event into the cached window, a cold start encodes the window.
Writes benchmarks/results/time_bias_serve.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_bench import machine, write_results  # noqa: E402

HOUR_MS = 3_600_000
OPERATIONS = ("recommend", "append", "start")


def windows(model, data: Path, users: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(items, types, times) of the first ``users`` users with at least 3 events."""
    from trainer.predict import histories_from_data

    out = []
    for h in histories_from_data(data, model):
        if len(h.items) >= 3:
            out.append((h.items.tolist(), h.types.tolist(), h.times.tolist()))
        if len(out) == users:
            break
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def time_user(model, items: list[int], types: list[int], times: list[int]) -> dict[str, float]:
    """Milliseconds of each operation for one user's window (the last event is the one appended)."""
    import torch

    state = model.start(items[:-1], types[:-1], times[:-1])
    out = {"append": timed(lambda: model.append(state, items[-1], types[-1], times[-1]))}
    full = model.start(items, types, times)
    at = times[-1] + HOUR_MS
    context = model.context([items])

    def recommend():
        hidden = model.hidden_at(full, at)[None]
        model.top_k(hidden, 10, context=context, gap_ms=torch.tensor([at - times[-1]]), at_ms=torch.tensor([at]))

    out["recommend"] = timed(recommend)
    out["start"] = timed(lambda: model.start(items, types, times))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", required=True, help="run folder trained without model.time_bias")
    parser.add_argument("--biased", required=True, help="run folder trained with model.time_bias")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="passes over the users")
    args = parser.parse_args()
    import torch

    from trainer.config import load_run_config
    from trainer.export import load_inference

    torch.set_num_threads(1)
    models = {"plain": load_inference(Path(args.plain), log=lambda *a: None)}
    models["time_bias"] = load_inference(Path(args.biased), log=lambda *a: None)
    if models["plain"].time_bias is not None or models["time_bias"].time_bias is None:
        raise SystemExit("--plain must be a run without model.time_bias and --biased one with it")
    data = Path(load_run_config(Path(args.plain)).data.path)
    users = windows(models["plain"], data, args.users)
    for model in models.values():
        model.warmup()
    samples = {name: {op: [] for op in OPERATIONS} for name in models}
    for _ in range(args.repeats):
        for window in users:
            for name, model in models.items():
                for op, ms in time_user(model, *window).items():
                    samples[name][op].append(ms)
    metrics: dict[str, float] = {"users": len(users), "max_len": models["plain"].max_len}
    for name, ops in samples.items():
        for op, values in ops.items():
            metrics[f"{name}_{op}_p50_ms"] = round(float(np.percentile(values, 50)), 3)
            metrics[f"{name}_{op}_p99_ms"] = round(float(np.percentile(values, 99)), 3)
    for op in OPERATIONS:
        metrics[f"{op}_p50_ratio"] = round(metrics[f"time_bias_{op}_p50_ms"] / metrics[f"plain_{op}_p50_ms"], 2)
    command = "python benchmarks/time_bias_serve.py " + " ".join(sys.argv[1:])
    result = {
        "benchmark": "time_bias_serve",
        "dataset": f"{data.name}: the latest window of {len(users)} users of the runs' data",
        "command": command,
        "machine": machine(),
        "metrics": metrics,
        "goal": "report what model.time_bias costs per request (issue 15: the flag must be servable)",
    }
    lines = [
        "# What model.time_bias costs a server (1 thread)",
        "",
        f"`{command}` on {result['machine']}",
        "",
        f"{len(users)} users x {args.repeats} passes, windows of up to {models['plain'].max_len} events.",
        "",
        "| operation | plain p50 ms | plain p99 ms | time bias p50 ms | time bias p99 ms | p50 ratio |",
        "|---|---|---|---|---|---|",
    ]
    for op in OPERATIONS:
        lines.append(
            f"| {op} | {metrics[f'plain_{op}_p50_ms']} | {metrics[f'plain_{op}_p99_ms']} | "
            f"{metrics[f'time_bias_{op}_p50_ms']} | {metrics[f'time_bias_{op}_p99_ms']} | {metrics[f'{op}_p50_ratio']}x |"
        )
    write_results("time_bias_serve", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
