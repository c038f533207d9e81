"""``dreamlab worker``: run the jobs of a shared Redis queue, on any machine that reaches the Redis server;
the API node is ``dreamlab serve --queue`` with the same URL (docs/serving.md, "Workers on several
machines"). Imports stay light until the command runs."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("worker", help="run the jobs of a shared Redis queue (the API node: dreamlab serve --queue)")
    w.add_argument("--queue", required=True, help="the Redis server: redis://HOST:PORT/DB, as given to dreamlab serve --queue")
    w.add_argument("--model", help="the API node's model (folder or single-file checkpoint); default: the installed default model")
    w.add_argument("--prediction", choices=("epsilon", "v"), help="a single-file checkpoint's prediction type (as for serve)")
    w.add_argument("--device", default="cpu")
    w.add_argument("--threads", type=int, help="CPU threads for torch")
    w.add_argument("--allow-pickle", action="store_true", help="allow pickled weights (unsafe for untrusted files)")
    w.add_argument("--preview-every", type=int, default=2, help="decode a preview every N steps; 0: none (default: 2)")
    add_heartbeat_arg(w)
    w.add_argument("--log-level", default="info")
    w.set_defaults(func=cmd_worker)


def add_heartbeat_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0,
                        help="with a Redis queue: seconds without a heartbeat after which a worker counts as dead and "
                             "its job goes to another (the same on every node; default: %(default)s)")


def cmd_worker(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    import torch

    from ..errors import DreamlabError
    from ..loading.model import load_model
    from ..metadata import weights_sha256
    from .redis_queue import RedisQueue, shown
    from .redis_worker import RedisWorker

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    queue = RedisQueue(args.queue, heartbeat_timeout=args.heartbeat_timeout)  # a bad URL fails before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, allow_pickle=args.allow_pickle, prediction=args.prediction)
    expected, mine = queue.redis.get(queue.key("model")), weights_sha256(model.files) or ""
    if expected is not None and expected.decode() != mine:  # the API node checks requests against its own model
        raise DreamlabError(f"this worker's model ({mine[:10] or 'no hash'}) is not the API node's ({expected.decode()[:10]}): "
                            "load the same model with --model")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = RedisWorker(model, queue, preview_every=args.preview_every)
    worker.start()
    print(f"dreamlab worker {queue.name} running jobs from {shown(args.queue)}", flush=True)
    while not stop.wait(1.0):
        pass
    worker.stop()  # the running job, if any, goes back to the queue
    queue.close()
    return 0
