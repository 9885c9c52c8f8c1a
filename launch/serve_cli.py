"""`bgpt serve`: run the recommendation API for a run or an export."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from data_sharding.errors import BgptError


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP API: learn events as they arrive, recommend in milliseconds",
        description="FastAPI + uvicorn service (OpenAPI docs at /docs). Binds to 127.0.0.1 unless --host says "
        "otherwise. Writes need `Authorization: Bearer TOKEN` when --token or $BGPT_SERVE_TOKEN is set.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN", help="a training run (its best weights; reloaded when they change)")
    source.add_argument("--model", metavar="DIR", help="an export from `bgpt export` (reloaded when replaced)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state", metavar="FILE", help="SQLite file of user histories (default: SOURCE/serve.sqlite)")
    p.add_argument("--history-size", type=int, help="events kept per user (default: the model's max_len)")
    p.add_argument("--cache-users", type=int, default=4096, help="users whose key/value caches stay in memory")
    p.add_argument("--slack", type=int, help="events a cached window may lag a full re-encode (default max_len/5)")
    p.add_argument("--reload-seconds", type=float, default=5.0, help="poll for newer weights (0: never)")
    p.add_argument("--quantize", choices=("int8",), help="dynamic int8 quantization of the backbone")
    p.add_argument("--threads", type=int, default=1, help="torch threads for inference")
    p.add_argument("--token", help="bearer token required for writes (or $BGPT_SERVE_TOKEN)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted")
    p.add_argument(
        "--durability",
        choices=("normal", "full"),
        default="normal",
        help="normal: accepted events survive a killed process; full: also a power cut",
    )
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.app import create_app
    from serving.service import Recommender, ServiceConfig

    source = Path(args.run or args.model)
    if not source.exists():
        raise BgptError(f"{source} does not exist")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServiceConfig(
        source=source,
        state=Path(args.state) if args.state else source / "serve.sqlite",
        history_size=args.history_size,
        cache_users=args.cache_users,
        slack=args.slack,
        reload_seconds=args.reload_seconds,
        quantize=args.quantize,
        threads=args.threads,
        durability=args.durability,
    )
    service = Recommender(cfg)
    token = args.token or os.environ.get("BGPT_SERVE_TOKEN") or None
    app = create_app(service, token=token, max_body_bytes=args.max_body_kb * 1024)
    logging.getLogger("bgpt.serve").info(
        "serving %s on http://%s:%d (state %s, writes %s)",
        service.current.model.version,
        args.host,
        args.port,
        cfg.state,
        "need a token" if token else "open",
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
