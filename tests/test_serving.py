"""The recommendation service: cached windows, and the real server process driven over HTTP."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import free_port
from test_inference import run_config

from serving.service import Recommender, RequestError, ServiceConfig
from serving.store import Event
from trainer.export import export_run
from trainer.run import train_run

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cyclic_data):
    """Two runs of the cycle model (60 and 30 steps): versions to hot-swap between."""
    root = tmp_path_factory.mktemp("serve")
    train_run(root / "a", run_config(cyclic_data), log=lambda *a: None)
    train_run(root / "b", run_config(cyclic_data, dropout=0.0), log=lambda *a: None)
    return root / "a", root / "b"


def events(*items, start=1_600_000_000_000, types=None):
    return [Event(item, (types or {}).get(item, "view"), start + 60_000 * i) for i, item in enumerate(items)]


@pytest.mark.parametrize("slack", [0, 2])
def test_cached_windows_match_a_fresh_encoding_of_the_window_they_claim(runs, tmp_path, slack):
    service = Recommender(ServiceConfig(runs[0], tmp_path / "s.sqlite", history_size=20, slack=slack, reload_seconds=0))
    model = service.current.model
    walk = [f"i{i % 12}" for i in range(15)]  # longer than max_len (6): windows must be rebuilt
    service.add_events("u", events(walk[0]))
    service.recommend("u", None, 3)  # caches the window
    for n in range(2, len(walk) + 1):
        service.add_events("u", events(*walk[:n])[-1:])
        state = service.current.caches["u"]
        assert model.max_len - slack <= state.length <= model.max_len or n < model.max_len - slack
        window = service.store.history("u")[-state.length :]
        fresh = model.start(*service._ids(model, window))
        torch.testing.assert_close(state.hidden, fresh.hidden, atol=1e-5, rtol=1e-5)
        if slack == 0:  # always exactly the last max_len events
            assert state.length == min(n, model.max_len)
    assert service.recommend("u", None, 1)["items"][0]["item"] == "i3"  # ... i14 % 12 = i2 -> i3
    # a batch of events, out of order within itself, crossing the window boundary
    batch = events(*[f"i{i % 12}" for i in range(15, 19)], start=1_600_000_000_000 + 60_000 * 15)
    service.add_events("u", [batch[2], batch[0], batch[3], batch[1]])
    state = service.current.caches["u"]
    fresh = model.start(*service._ids(model, service.store.history("u")[-state.length :]))
    torch.testing.assert_close(state.hidden, fresh.hidden, atol=1e-5, rtol=1e-5)
    assert service.store.history("u")[-1].item == "i6" and state.last_time == batch[3].ts
    service.stop()


def test_unknown_items_are_refused_before_anything_is_stored(runs, tmp_path):
    service = Recommender(ServiceConfig(runs[0], tmp_path / "s.sqlite", reload_seconds=0))
    with pytest.raises(RequestError, match="unknown items"):
        service.add_events("u", events("i1", "nope"))
    assert service.store.history("u") == []
    service.stop()


class Server:
    """`bgpt serve` in its own process on a free loopback port."""

    def __init__(self, source: Path, state: Path, *extra: str, flag: str = "--run") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "launch.cli", "serve", flag, str(source), "--port", str(self.port)]
        cmd += ["--state", str(state), "--token", TOKEN, *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()[-2000:]}")
            try:
                self.get("/healthz")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start within 60 s")

    def request(self, method, path, body=None, token=None, raw=None, content_type="application/json"):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode()
                return resp.status, json.loads(text) if path != "/metrics" else text
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "null")

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body, token=TOKEN):
        return self.request("POST", path, body, token=token)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def server(runs, tmp_path):
    srv = Server(runs[0], tmp_path / "state.sqlite", "--reload-seconds", "0")
    yield srv
    srv.stop()


def stamp(i):
    return 1_600_000_000 + 60 * i  # seconds: the server reads numbers below 1e11 as seconds


def test_a_recommend_after_an_event_reflects_that_event(server):
    status, body = server.post(
        "/v1/events", {"user": "web-1", "events": [{"item": "i4", "event_type": "view", "timestamp": stamp(0)}]}
    )
    assert status == 200 and body == {"user": "web-1", "accepted": 1, "history_length": 1}
    status, rec = server.post("/v1/recommend", {"user": "web-1", "k": 3}, token=None)  # reads need no token
    assert status == 200 and rec["items"][0]["item"] == "i5" and rec["history_length"] == 1
    for i, item in enumerate(["i5", "i6", "i7"], start=1):
        server.post(
            "/v1/events", {"user": "web-1", "events": [{"item": item, "event_type": "view", "timestamp": stamp(i)}]}
        )
        _, rec = server.post("/v1/recommend", {"user": "web-1", "k": 3})
        assert rec["items"][0]["item"] == f"i{int(item[1:]) + 1}"  # every event moves the prediction
    assert rec["next_event_type"] == "buy" and rec["next_event_seconds"] > 0
    _, unseen = server.post("/v1/recommend", {"user": "web-1", "k": 12, "exclude_seen": True})
    assert {"i4", "i5", "i6", "i7"}.isdisjoint(i["item"] for i in unseen["items"]) and len(unseen["items"]) == 8
    _, given = server.post("/v1/recommend", {"history": [{"item": "i9", "event_type": "buy", "timestamp": stamp(0)}]})
    assert given["items"][0]["item"] == "i10" and given["user"] is None
    _, metrics = server.get("/metrics")
    assert 'bgpt_requests_total{method="POST",path="/v1/events",status="200"} 4' in metrics
    assert 'bgpt_request_seconds_bucket{path="/v1/recommend",le="+Inf"} 6' in metrics
    assert "bgpt_model_info{version=" in metrics and "bgpt_cache_hits_total" in metrics


def test_writes_need_the_token_and_bad_requests_get_a_reason(server):
    one = {"user": "u", "events": [{"item": "i1", "event_type": "view"}]}
    assert server.post("/v1/events", one, token=None)[0] == 401
    assert server.post("/v1/events", one, token="wrong")[0] == 401
    status, body = server.request("POST", "/v1/events", raw=b'{"user": "u", "events": [', token=TOKEN)
    assert status == 400 and body["detail"][0]["type"] == "json_invalid"
    status, body = server.post(
        "/v1/events",
        {"user": "u", "events": [{"item": "i1", "event_type": "view"}, {"item": "no-such-item", "event_type": "view"}]},
    )
    assert status == 422 and "no-such-item" in body["detail"]
    assert server.post("/v1/recommend", {"user": "u"})[0] == 404  # the refused batch stored nothing
    status, body = server.post("/v1/events", {"user": "u", "events": [{"item": "i1", "event_type": "click"}]})
    assert status == 422 and "unknown event type 'click'" in body["detail"]
    assert server.post("/v1/events", {"user": "u", "events": [{"item": "i1"}]})[0] == 422  # two types: say which
    assert server.post("/v1/recommend", {"k": 3})[0] == 422  # neither user nor history
    assert server.post("/v1/recommend", {"user": "u", "k": 0})[0] == 422
    assert server.post("/v1/events", {"user": "u", "events": [{"item": "i1", "timestamp": "yesterday"}]})[0] == 422
    assert server.request("POST", "/v1/recommend", raw=b"user=u", content_type="text/plain")[0] == 415
    big = {"history": [{"item": "i1", "event_type": "view", "timestamp": stamp(0)}] * 40_000}
    assert server.post("/v1/recommend", big)[0] == 413
    assert chunked_post(server, "/v1/recommend", b'{"history": [' + b" " * (10 << 20) + b"]}") == 413
    small = json.dumps({"history": [{"item": "i1", "event_type": "view", "timestamp": stamp(0)}]}).encode()
    assert chunked_post(server, "/v1/recommend", small, chunk=7) == 200  # many small chunks, one body
    assert server.get("/healthz")[0] == 200 and server.get("/openapi.json")[0] == 200
    _, metrics = server.get("/metrics")
    assert 'status="500"' not in metrics


def chunked_post(server: Server, path: str, body: bytes, chunk: int = 1 << 16) -> int:
    """POST with Transfer-Encoding: chunked (no Content-Length); the response status."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    pieces = (body[i : i + chunk] for i in range(0, len(body), chunk))
    conn.request("POST", path, body=pieces, headers=headers, encode_chunked=True)
    status = conn.getresponse().status
    conn.close()
    return status


def test_a_restart_loses_no_accepted_event(runs, tmp_path):
    state = tmp_path / "state.sqlite"
    first = Server(runs[0], state, "--reload-seconds", "0")
    try:
        for i, item in enumerate(["i1", "i2", "i3"]):
            first.post(
                "/v1/events", {"user": "r", "events": [{"item": item, "event_type": "view", "timestamp": stamp(i)}]}
            )
        _, before = first.post("/v1/recommend", {"user": "r"})
    finally:
        first.kill()  # no shutdown hook runs
    second = Server(runs[0], state, "--reload-seconds", "0")
    try:
        _, after = second.post("/v1/recommend", {"user": "r"})
        assert after["history_length"] == 3 and after["items"] == before["items"]
    finally:
        second.stop()


def test_hot_reload_under_load_fails_no_request(runs, tmp_path):
    export = tmp_path / "export"
    first = export_run(runs[0], export)
    srv = Server(export, tmp_path / "state.sqlite", "--reload-seconds", "0.2", flag="--model")
    statuses, versions, stop = [], set(), threading.Event()

    def load():
        while not stop.is_set():
            status, body = srv.post(
                "/v1/recommend", {"history": [{"item": "i3", "event_type": "view", "timestamp": stamp(0)}]}
            )
            statuses.append(status)
            if status == 200:
                versions.add(body["model_version"])

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1.0)
        second = export_run(runs[1], export, overwrite=True)
        deadline = time.time() + 60
        while srv.get("/healthz")[1]["model_version"] != second["version"] and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
        srv.stop()
    assert versions == {first["version"], second["version"]}
    assert len(statuses) > 20 and set(statuses) == {200}


def test_a_broken_new_version_is_counted_and_the_old_model_keeps_serving(runs, tmp_path):
    export = tmp_path / "export"
    first = export_run(runs[0], export)
    service = Recommender(ServiceConfig(export, tmp_path / "s.sqlite", reload_seconds=0))
    assert not service.reload_if_changed()  # nothing changed
    meta = json.loads((export / "export.json").read_text())
    time.sleep(0.01)
    (export / "export.json").write_text(json.dumps({**meta, "format": 99}))
    assert not service.reload_if_changed() and service.reload_failures == 1
    assert not service.reload_if_changed() and service.reload_failures == 1  # not retried until it changes
    assert service.current.model.version == first["version"]
    assert service.recommend(None, events("i2"), 1)["items"][0]["item"] == "i3"
    second = export_run(runs[1], export, overwrite=True)
    assert service.reload_if_changed() and service.current.model.version == second["version"]
    service.stop()
