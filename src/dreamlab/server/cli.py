"""``dreamlab serve``: the API, queue and web UI on one port. Imports stay light until the command runs."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from .worker_cli import add_heartbeat_arg


def add_cli(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="HTTP API, job queue and web UI")
    s.add_argument("--model", help="model folder (diffusers format) or single-file SD checkpoint (.safetensors); "
                   "default: the installed default model")
    s.add_argument("--prediction", choices=("epsilon", "v"),
                   help="a single-file checkpoint's prediction type, where the file does not say it right (SD 2.x: v unless it says otherwise)")
    s.add_argument("--data", default="dreamlab-data", help="folder for the job database and the gallery (default: %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; the API has no authentication)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, help="CPU threads for torch")
    s.add_argument("--allow-pickle", action="store_true", help="allow pickled weights (unsafe for untrusted files)")
    s.add_argument("--max-steps", type=int, help="default 150")
    s.add_argument("--max-side", type=int, help="largest width or height in pixels (default 1024)")
    s.add_argument("--max-batch", type=int, help="default 8")
    s.add_argument("--max-queue", type=int, help="jobs queued or running before submissions get 429 (default 256)")
    s.add_argument("--max-upload-mb", type=float, help="largest request body, images included (default 24)")
    s.add_argument("--preview-every", type=int, default=2, help="decode a preview every N steps; 0: none (default: 2)")
    s.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable; default: none)")
    s.add_argument("--no-ui", action="store_true", help="serve the API only")
    s.add_argument("--queue", help="share the job queue with `dreamlab worker`s on other machines through this Redis "
                   "server: redis://HOST:PORT/DB (default: the embedded SQLite queue in --data)")
    s.add_argument("--no-worker", action="store_true", help="run no worker in this process (with --queue: only the "
                   "`dreamlab worker`s run jobs)")
    add_heartbeat_arg(s)
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    import uvicorn

    from ..loading.model import load_model
    from .app import create_app
    from .service import Limits

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "max_steps": args.max_steps,
        "max_side": args.max_side,
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "max_body_bytes": int(args.max_upload_mb * 2**20) if args.max_upload_mb else None,
    }
    limits = dataclasses.replace(Limits(), **{k: v for k, v in overrides.items() if v is not None})
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: binding {args.host}: anyone who can reach it can use this server (no authentication)", file=sys.stderr)
    if args.queue:
        from .redis_queue import RedisQueue

        queue = RedisQueue(args.queue, heartbeat_timeout=args.heartbeat_timeout)  # a bad URL fails before the model loads
    model = load_model(args.model, device=args.device, allow_pickle=args.allow_pickle, prediction=args.prediction)
    app = create_app(model, args.data, limits=limits, preview_every=args.preview_every, run_worker=not args.no_worker,
                     cors_origins=tuple(args.cors_origin), ui=not args.no_ui, device=args.device,
                     allow_pickle=args.allow_pickle, queue=queue if args.queue else None)
    print(f"dreamlab serving on http://{args.host}:{args.port}/  (API docs: /docs, /redoc; A1111 API: /sdapi/v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
