"""Serving benchmark: `bgpt serve` under a loopback load generator, plus the cost of one event
with and without the key/value cache.

    python benchmarks/serve_bench.py              # both models (trains the SmolLM2 run if missing)

Models (MovieLens-1M users 1-2999, real 50-event histories):
  small   the SASRec-size run of `accuracy_bench.py ml1m --config benchmarks/configs/ml1m_sasrec.yaml`
          (2 blocks x 64, bench_data/run_ml1m_sasrec)
  smollm2 SmolLM2-135M, first 4 blocks, LoRA merged; a short run (bench_data/run_serve_smollm2_4):
          latency does not depend on how long it trained

Load: an open-loop generator (requests leave on a fixed schedule whatever the server does;
latency counts from the scheduled time, so queueing is not hidden) at the target rate over 1, 8
and 32 keep-alive connections, and a closed loop (each connection sends as soon as it has an
answer) for the highest throughput. The generator runs on the same 2 cores as the server.

Requests: `history` = POST /v1/recommend with a 50-event history in the body (encoded in full
every time: the worst case); `user` = a stored user's recommend (their cached window: scoring
only); `event` = POST /v1/events, 10 events each for rate x seconds / 10 cached users (one
backbone step each, plus a window rebuild once in every `slack` events when the window is full).
Each request kind gets 2 s of unmeasured warm-up traffic first.
Writes benchmarks/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_bench import REPO, machine, write_results  # noqa: E402

BGPT = [sys.executable, "-m", "launch.cli"]
DATA = REPO / "bench_data" / "shards_ml1m"
RUNS = {"small": REPO / "bench_data" / "run_ml1m_sasrec", "smollm2": REPO / "bench_data" / "run_serve_smollm2_4"}
TARGET_RPS = {"small": 200, "smollm2": 20}
GOAL_P99_MS = {"small": 10, "smollm2": 50}


# ----- load generator ---------------------------------------------------------------------------
def http_request(path: str, body: dict, token: str | None = None) -> bytes:
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status


async def connect(port: int, n: int) -> list[Connection]:
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(Connection(reader, writer))
    return conns


async def open_loop(port: int, requests: list[bytes], rate: float, concurrency: int) -> dict:
    """Send requests[i] at t0 + i/rate on whichever connection is free; latency from the schedule."""
    conns = await connect(port, concurrency)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for c in conns:
        idle.put_nowait(c)
    latencies, errors = [], 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(i: int, request: bytes) -> None:
        nonlocal errors
        conn = await idle.get()
        try:
            status = await conn.send(request)
        finally:
            idle.put_nowait(conn)
        errors += status != 200
        latencies.append(loop.time() - (start + i / rate))

    tasks = []
    for i, request in enumerate(requests):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, request)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    for c in conns:
        c.writer.close()
    return summary(latencies, errors, elapsed)


async def closed_loop(port: int, requests: list[bytes], concurrency: int, seconds: float) -> dict:
    conns = await connect(port, concurrency)
    latencies, errors = [], 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    counter = iter(range(10**9))

    async def worker(conn: Connection) -> None:
        nonlocal errors
        while loop.time() < end:
            request = requests[next(counter) % len(requests)]
            sent = loop.time()
            errors += await conn.send(request) != 200
            latencies.append(loop.time() - sent)

    started = loop.time()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = loop.time() - started
    for c in conns:
        c.writer.close()
    return summary(latencies, errors, elapsed)


async def measured(run):
    """The load generator's own garbage collector off while it measures (this process also holds a
    model for the in-process figures: a full collection would stall its event loop and show up as
    server latency)."""
    gc.collect()
    gc.disable()
    try:
        return await run
    finally:
        gc.enable()


def server_slow(port: int) -> int:
    """Recommends the server has answered in more than 25 ms so far (its latency histogram)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    total = fast = 0
    for line in text.splitlines():
        if line.startswith('bgpt_request_seconds_bucket{path="/v1/recommend",le="0.025"}'):
            fast = int(line.split()[-1])
        elif line.startswith('bgpt_request_seconds_bucket{path="/v1/recommend",le="+Inf"}'):
            total = int(line.split()[-1])
    return total - fast


def summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "requests": len(ms),
        "errors": int(errors),
        "rps": round(len(ms) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


# ----- setup ------------------------------------------------------------------------------------
def ensure_runs() -> None:
    if not (RUNS["small"] / "config.yaml").exists():
        sys.exit(
            f"{RUNS['small']} is missing: python benchmarks/accuracy_bench.py ml1m "
            "--config benchmarks/configs/ml1m_sasrec.yaml --name ml1m_sasrec"
        )
    if not (RUNS["smollm2"] / "config.yaml").exists():
        subprocess.run(
            [*BGPT, "train", "--data", str(DATA), "--out", str(RUNS["smollm2"]), "--num-layers", "4", "--model.pretrained_weights=true",
             "--max-steps", "20", "--batch-size", "16", "--train.eval_every=0", "--model.item_attributes=false"],
            check=True, cwd=REPO,
        )  # fmt: skip


def histories(model_dir: Path, n: int) -> list[tuple[str, list[dict]]]:
    """Real ML-1M users with at least 50 events: their latest 50 as request events."""
    from trainer.export import load_inference
    from trainer.predict import histories_from_data

    model = load_inference(model_dir)
    out = []
    for h in histories_from_data(DATA, model):
        if len(h.items) >= 50:
            events = [
                {"item": model.items[i], "event_type": "event", "timestamp": int(t)}
                for i, t in zip(h.items[-50:], h.times[-50:], strict=True)
            ]
            out.append((h.user, events))
        if len(out) == n:
            break
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, state: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [*BGPT, "serve", "--run", str(run), "--port", str(port), "--state", str(state)]
    cmd += ["--threads", str(threads), "--reload-seconds", "0", "--token", "bench", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def cost_of_one_event(run: Path, users: list[tuple[str, list[dict]]], threads: int) -> dict:
    """In-process: appending one event with the cache (one step) vs re-encoding the 50-event window."""
    import torch

    from trainer.export import load_inference

    torch.set_num_threads(threads)
    model = load_inference(run)
    cached, full = [], []
    for _, events in users[:100]:
        items = model.item_ids([e["item"] for e in events])
        times = [e["timestamp"] for e in events]  # already milliseconds
        types = [1] * len(items)
        state = model.start(items[:-1], types[:-1], times[:-1])
        t0 = time.perf_counter()
        model.append(state, items[-1], 1, times[-1])
        t1 = time.perf_counter()
        model.start(items, types, times)
        t2 = time.perf_counter()
        cached.append(t1 - t0)
        full.append(t2 - t1)
    return {
        "event_cached_p50_ms": round(float(np.median(cached)) * 1000, 3),
        "event_reencode_p50_ms": round(float(np.median(full)) * 1000, 3),
        "event_cache_speedup": round(float(np.median(full) / np.median(cached)), 2),
    }


def bench_model(name: str, threads: int, seconds: float, tmp: Path) -> dict:
    run = RUNS[name]
    users = histories(run, 1000)
    rate = TARGET_RPS[name]
    state = tmp / f"{name}.sqlite"
    state.unlink(missing_ok=True)
    proc, port = start_server(run, state, threads, ["--cache-users", "2000"])
    results: dict = {"model": name, "threads": threads, "events": cost_of_one_event(run, users, threads)}
    try:
        # store every user's history (this also builds their cached windows on first recommend)
        setup = [http_request("/v1/events", {"user": u, "events": ev}, "bench") for u, ev in users]
        warm = [http_request("/v1/recommend", {"user": u, "k": 10}) for u, _ in users]
        for batch in (setup, warm):
            asyncio.run(open_loop(port, batch, rate=10_000, concurrency=1))
        by_history = [http_request("/v1/recommend", {"history": ev, "k": 10}) for _, ev in users]
        by_user = [http_request("/v1/recommend", {"user": u, "k": 10}) for u, _ in users]
        n = int(rate * seconds)
        for kind, requests in (("history", by_history), ("user", by_user)):
            asyncio.run(open_loop(port, requests[: rate * 2], rate, 8))  # 2 s unmeasured warm-up
            for c in (1, 8, 32):
                schedule = [requests[i % len(requests)] for i in range(n)]
                before = server_slow(port)
                results[f"{kind}_open_c{c}"] = asyncio.run(measured(open_loop(port, schedule, rate, c)))
                # requests the server itself took > 25 ms over: tells server stalls from client ones
                results[f"{kind}_open_c{c}"]["server_over_25ms"] = server_slow(port) - before
                results[f"{kind}_closed_c{c}"] = asyncio.run(measured(closed_loop(port, requests, c, seconds)))
                print(name, kind, c, results[f"{kind}_open_c{c}"], results[f"{kind}_closed_c{c}"], flush=True)
        # Appends: a steady stream for n / 10 users (10 events each, in time order), so the window
        # rebuilds (one in every `slack` events once a window is full) count at their real rate.
        base = 1_100_000_000  # seconds, after every ML-1M event
        active = users[: max(1, n // 10)]
        appends = [
            http_request(
                "/v1/events", {"user": u, "events": [{**ev[-1 - i // len(active)], "timestamp": base + i}]}, "bench"
            )
            for i, (u, ev) in ((i, active[i % len(active)]) for i in range(n))
        ]
        results["event_open_c8"] = asyncio.run(open_loop(port, appends, rate, 8))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("bgpt_gc_max_seconds{"):
                    generation = line.split('"')[1]
                    results["events"][f"gc_max_ms_gen{generation}"] = round(float(line.split()[-1]) * 1000, 2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,smollm2")
    parser.add_argument("--seconds", type=float, default=10.0, help="per load level")
    parser.add_argument("--threads", default="small=1,smollm2=1", help="torch threads in the server, per model")
    parser.add_argument("--name", default="serving", help="results file name")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_runs()
    threads = dict(kv.split("=") for kv in args.threads.split(","))
    tmp = REPO / "bench_data" / "serve_state"
    tmp.mkdir(parents=True, exist_ok=True)
    results = {m: bench_model(m, int(threads[m]), args.seconds, tmp) for m in args.models.split(",")}
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    metrics: dict[str, float] = {}
    if "small" in results:
        worst = max((results["small"][f"history_open_c{c}"] for c in (1, 8, 32)), key=lambda r: r["p99_ms"])
        metrics.update(p50_ms=worst["p50_ms"], p99_ms=worst["p99_ms"], rps=worst["rps"])
    for name, r in results.items():
        for key, value in r.items():
            if isinstance(value, dict):
                for field in ("p50_ms", "p99_ms", "rps", "errors", "server_over_25ms"):
                    if field in value:
                        metrics[f"{name}_{key}_{field}"] = value[field]
                for field, v in value.items():
                    if field.startswith("event_"):
                        metrics[f"{name}_{field}"] = v
    out = {
        "benchmark": "serving",
        "dataset": "MovieLens-1M users 1-2999 (latest 50 events of users with >= 50)",
        "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "metrics": metrics,
        "goal": "recommend with a 50-event history: p99 <= 10 ms at 200 requests/s for the small model, "
        "p99 <= 50 ms at 20 requests/s for SmolLM2 (4 layers); headline p50/p99/rps = the worst "
        "concurrency (1, 8, 32) of the small model's open-loop history requests at 200 requests/s",
        "details": results,
    }
    lines = [
        "# serving: `bgpt serve` on loopback, load generator on the same 2 cores",
        "",
        f"`{out['command']}` on {out['machine']}",
        "",
        "Open loop = fixed arrival rate (latency from the scheduled send time); closed loop = each "
        "connection sends again as soon as it has an answer (highest throughput).",
        "",
        "| model | request | connections | open-loop rate | p50 ms | p99 ms | errors | server > 25 ms | "
        "closed-loop rps | closed p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for kind in ("history", "user"):
            for c in (1, 8, 32):
                o, cl = r[f"{kind}_open_c{c}"], r[f"{kind}_closed_c{c}"]
                lines.append(
                    f"| {name} | {kind} | {c} | {TARGET_RPS[name]}/s | {o['p50_ms']} | {o['p99_ms']} | "
                    f"{o['errors']} | {o.get('server_over_25ms', '')} | {cl['rps']} | {cl['p99_ms']} |"
                )
        e = r["event_open_c8"]
        lines.append(
            f"| {name} | event | 8 | {TARGET_RPS[name]}/s | {e['p50_ms']} | {e['p99_ms']} | {e['errors']} | | | |"
        )
    lines += ["", "One event, in process (median of 100 users with 50-event windows):", ""]
    lines += ["| model | cached append ms | re-encode 50 events ms | speed-up |", "|---|---|---|---|"]
    for name, r in results.items():
        ev = r["events"]
        lines.append(
            f"| {name} | {ev['event_cached_p50_ms']} | {ev['event_reencode_p50_ms']} | {ev['event_cache_speedup']}x |"
        )
    write_results(args.name, out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
