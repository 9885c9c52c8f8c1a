"""Request counters and latency histograms in the Prometheus text exposition format."""

from __future__ import annotations

import bisect
import gc
import time
from collections import defaultdict

# Seconds; fine-grained below 50 ms where the latency goals are.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: dict[str, float] = defaultdict(float)
        self.gc_seconds = [0.0, 0.0, 0.0]
        self.gc_max = [0.0, 0.0, 0.0]
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict) -> None:
        """Time every garbage-collector pass: a full collection stalls every request in flight."""
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._gc_started
        self.gc_seconds[info["generation"]] += seconds
        self.gc_max[info["generation"]] = max(self.gc_max[info["generation"]], seconds)

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests[(method, path, status)] += 1
        self.buckets[path][bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[path] += seconds

    def render(self, gauges: dict[str, tuple[str, float]], info: dict[str, str]) -> str:
        """``gauges``: name -> (help, value); ``info``: labels of the bgpt_model_info gauge."""
        lines = [
            "# HELP bgpt_requests_total HTTP requests by method, path and status.",
            "# TYPE bgpt_requests_total counter",
        ]
        for (method, path, status), n in sorted(self.requests.items()):
            lines.append(f'bgpt_requests_total{{method="{method}",path="{path}",status="{status}"}} {n}')
        lines += [
            "# HELP bgpt_request_seconds Request latency inside the server.",
            "# TYPE bgpt_request_seconds histogram",
        ]
        for path, counts in sorted(self.buckets.items()):
            total = 0
            for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                total += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'bgpt_request_seconds_bucket{{path="{path}",le="{le}"}} {total}')
            lines.append(f'bgpt_request_seconds_sum{{path="{path}"}} {self.sums[path]:.6f}')
            lines.append(f'bgpt_request_seconds_count{{path="{path}"}} {total}')
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in info.items())
        lines += [
            "# HELP bgpt_model_info The model being served (value 1).",
            "# TYPE bgpt_model_info gauge",
            f"bgpt_model_info{{{labels}}} 1",
        ]
        lines += [
            "# HELP bgpt_gc_seconds_total Time in Python garbage collection by generation.",
            "# TYPE bgpt_gc_seconds_total counter",
        ]
        lines += [f'bgpt_gc_seconds_total{{generation="{g}"}} {s:.6f}' for g, s in enumerate(self.gc_seconds)]
        lines += [
            "# HELP bgpt_gc_max_seconds Longest single collection by generation.",
            "# TYPE bgpt_gc_max_seconds gauge",
        ]
        lines += [f'bgpt_gc_max_seconds{{generation="{g}"}} {s:.6f}' for g, s in enumerate(self.gc_max)]
        for name, (help_text, value) in gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
