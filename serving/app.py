"""`bgpt serve`: the HTTP API (FastAPI + uvicorn) over :class:`serving.service.Recommender`.

    POST /v1/events     append events for a user (bearer token when the server has one)
    POST /v1/items      add items the model has never seen (title, attributes): recommendable at
                        once, their vectors from their text (bearer token when the server has one)
    POST /v1/recommend  top-K for a stored user, or for a history sent in the request
    GET  /healthz       liveness and the model version
    GET  /metrics       Prometheus text: requests, latency histogram, model version, caches
    GET  /docs          OpenAPI documentation

Handlers are ``async`` and compute inline: one request holds the event loop for the few
milliseconds its forward pass takes, which on a CPU server beats handing work to a thread pool
(no GIL hand-offs), and every request sees a consistent model/cache pair.
"""

from __future__ import annotations

import hmac
import json
import time
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, field_validator

from serving.metrics import Metrics
from serving.service import Recommender, RequestError
from serving.store import Event

MAX_EVENTS_PER_REQUEST = 1000
DRAIN_FACTOR = 16
"""Bodies declared up to this many times the limit are read and dropped before the 413."""
MAX_ID_LENGTH = 256
MAX_ITEMS_PER_REQUEST = 1000
MAX_TEXT_LENGTH = 4096


class EventIn(BaseModel):
    item: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    event_type: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    """Required when the model knows several event types."""
    timestamp: int | float | str | None = Field(default=None, validate_default=True)
    """Epoch seconds or milliseconds (>= 1e11 read as ms), or ISO 8601; default: now."""

    @field_validator("timestamp")
    @classmethod
    def _to_ms(cls, value):
        if value is None:
            return int(time.time() * 1000)
        if isinstance(value, str):
            try:
                stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"timestamp {value!r} is not ISO 8601 or a number") from None
            return int(stamp.timestamp() * 1000)
        if value != value or abs(value) > 1e15:
            raise ValueError(f"timestamp {value!r} out of range")
        return int(round(value if abs(value) >= 1e11 else value * 1000))

    def event(self) -> Event:
        return Event(self.item, self.event_type, int(self.timestamp))


class EventsIn(BaseModel):
    user: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)


class ItemIn(BaseModel):
    item: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    title: str | None = Field(default=None, max_length=MAX_TEXT_LENGTH)
    attributes: dict[str, str | list[str]] | None = None
    """e.g. {"genres": ["Comedy", "Drama"], "brand": "Acme"}; values the model never saw are ignored."""

    def attribute_text(self) -> str | None:
        """The items table's form: ``name=v1|v2; other=w``."""
        if not self.attributes:
            return None
        parts = []
        for name, values in self.attributes.items():
            values = [values] if isinstance(values, str) else values
            parts.append(f"{name}={'|'.join(values)}")
        return "; ".join(parts)


class ItemsIn(BaseModel):
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class RecommendIn(BaseModel):
    user: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    """A user whose events the server stores (POST /v1/events)."""
    history: list[EventIn] | None = Field(default=None, min_length=1, max_length=MAX_EVENTS_PER_REQUEST)
    """Or the history itself, oldest first (not stored)."""
    k: int = Field(default=10, ge=1, le=1000)
    exclude_seen: bool = False
    event_types: list[str] | None = Field(default=None, min_length=1, max_length=64)
    """Read only the history's events of these types."""


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over ``limit`` bytes (declared or streamed), and the
    request counters/latency histogram for every response, rejected ones included."""

    def __init__(self, app, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        declared = dict(scope["headers"]).get(b"content-length")
        try:
            if declared is not None and int(declared) > self.limit:
                if int(declared) <= DRAIN_FACTOR * self.limit:  # read it, so the client sees the 413
                    while (await receive()).get("more_body"):  # rather than a reset connection
                        pass
                return await _too_large(self.limit, send_status)
            # Read the whole body here, however it is sent (a declared length or chunked), so the
            # limit holds before the app sees a byte: an error raised from inside the app's body
            # parsing would reach the client as FastAPI's 400, not 413.
            messages, seen, more = [], 0, True
            while more:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":  # the client went away
                    break
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
                if seen > self.limit:
                    while more and seen <= DRAIN_FACTOR * self.limit:
                        message = await receive()
                        seen += len(message.get("body", b""))
                        more = message.get("more_body", False) and message["type"] == "http.request"
                    return await _too_large(self.limit, send_status)

            async def replay():
                return messages.pop(0) if messages else await receive()

            await self.app(scope, replay, send_status)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.observe(scope["method"], path, status["code"], time.perf_counter() - started)


async def _too_large(limit: int, send) -> None:
    body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


KNOWN_PATHS = ("/v1/events", "/v1/recommend", "/healthz", "/metrics", "/docs", "/openapi.json")


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """415 for a body that is not JSON, 400 for malformed JSON, 422 for JSON of the wrong shape."""
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and not content_type.startswith("application/json"):
        return JSONResponse({"detail": "send the body as JSON with Content-Type: application/json"}, 415)
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return JSONResponse({"detail": detail}, status_code=status)


def _gauges(service: Recommender) -> tuple[dict, dict]:
    """The service's counters and gauges for /metrics, and the served model's info labels."""
    current = service.current
    gauges = {
        "bgpt_events_total": ("Events accepted since start.", service.events_total),
        "bgpt_model_reloads_total": ("Hot reloads of newer weights.", service.reloads),
        "bgpt_model_reload_failures_total": ("Reloads that failed (old model kept).", service.reload_failures),
        "bgpt_cache_hits_total": ("Recommends answered from a cached window.", service.cache_hits),
        "bgpt_cache_misses_total": ("Recommends that encoded the stored history.", service.cache_misses),
        "bgpt_cached_users": ("Users with a key/value cache in memory.", len(current.caches)),
        "bgpt_model_loaded_timestamp_seconds": ("When the served model was loaded.", round(current.loaded_at, 3)),
    }
    info = {"version": current.model.version, "quantized": str(current.model.quantized).lower()}
    return gauges, info


def _write_routes(app: FastAPI, service: Recommender, token: str | None) -> None:
    """The endpoints that change what the server holds (events, items): bearer token when set."""

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/events")
    async def add_events(body: EventsIn, request: Request):
        authorize(request)
        try:
            length = service.add_events(body.user, [e.event() for e in body.events])
        except RequestError as e:
            raise HTTPException(422, str(e)) from None
        return {"user": body.user, "accepted": len(body.events), "history_length": length}

    @app.post("/v1/items")
    async def add_items(body: ItemsIn, request: Request):
        authorize(request)
        items = body.items
        try:
            return service.add_items(
                [i.item for i in items], [i.title for i in items], [i.attribute_text() for i in items]
            )
        except RequestError as e:
            raise HTTPException(422, str(e)) from None


def create_app(service: Recommender, token: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start_watching()
        yield
        service.stop()

    app = FastAPI(
        title="behavior-gpt",
        description="Next-behaviour recommendations that learn from each event as it arrives.",
        version="1",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes, metrics=metrics)

    app.add_exception_handler(RequestValidationError, _invalid_request)

    _write_routes(app, service, token)

    @app.post("/v1/recommend")
    async def recommend(body: RecommendIn):
        if (body.user is None) == (body.history is None):
            raise HTTPException(422, "send exactly one of user (a stored user) or history")
        history = [e.event() for e in body.history] if body.history is not None else None
        try:
            return service.recommend(body.user, history, body.k, body.exclude_seen, body.event_types)
        except RequestError as e:
            raise HTTPException(422, str(e)) from None
        except LookupError as e:
            raise HTTPException(404, str(e.args[0])) from None

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model_version": service.current.model.version}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        gauges, info = _gauges(service)
        return metrics.render(gauges, info)

    return app
