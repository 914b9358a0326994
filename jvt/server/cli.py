"""``python -m jvt serve``: the OpenAI-compatible HTTP server (docs/server.md).

Builds the Engine on the engine thread (compiling its step shapes), then serves with uvicorn.
SIGINT / SIGTERM abort every request (open streams end with finish_reason "abort"), close the
engine (slots and chunks returned) and exit 0; a second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from jvt.server.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_REQUEST_BYTES,
)
from jvt.tools import PARSERS

ENGINE_FLAGS = (  # flag, type, help; each given flag becomes the EngineConfig field of its name
    ("--device", str, "cpu, cuda or cuda:N (default cpu)"),
    ("--dtype", str, "bfloat16, float16 or float32 (default: the model's; bfloat16 on CUDA)"),
    ("--weights", str, "GGUF weights: auto (quantized on the CPU), dense or quantized"),
    ("--max-num-seqs", int, "KV slots: sequences running at once"),
    ("--max-model-len", int, "prompt + generated tokens of one sequence"),
    ("--max-num-batched-tokens", int, "token budget of one step"),
    ("--kv-budget-bytes", int, "physical KV memory (default: every slot at max-model-len)"),
    ("--prefill-chunk", int, "most prompt tokens of one sequence per step"),
    ("--decode-steps", int, "most decode iterations of one pure-decode step (1: off)"),
    ("--token-buckets", str, "compiled token counts per step, comma-separated (e.g. 16,64)"),
    ("--seq-buckets", str, "compiled sequence counts per step, comma-separated (e.g. 4,16)"),
    ("--preemption-mode", str, "swap or recompute"),
    ("--swap-space-bytes", int, "host memory for swapped-out KV"),
    ("--seed", int, "base of the sampling seeds of requests that give none"),
    ("--gpu-memory-utilization", float,
     "CUDA: fraction of each GPU the engine may use, XLA's pool and KV (default 0.9)"),
    ("--compilation-cache-dir", str, "persistent compilation cache (default under the cache dir)"),
)
QUEUE_PER_SLOT = 8  # default --max-queue: this many waiting requests per KV slot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve subcommand's flags: server options, then the engine's."""
    parser.add_argument("--model", default=None,
                        help="a real model (smollm2-135m), a random-weights preset (tiny, ...) "
                             "or a checkpoint path (default: jvt.models.DEFAULT_MODEL)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) requests may use (default: the --model argument)")
    parser.add_argument("--api-key", default=os.environ.get("JVT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $JVT_API_KEY)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="unfinished requests allowed beyond --max-num-seqs before 503 "
                             f"(default {QUEUE_PER_SLOT} x max-num-seqs)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body; a larger one is a 413 before it is read "
                             f"(default {DEFAULT_MAX_REQUEST_BYTES})")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a client has to send a request's headers (default "
                             f"{DEFAULT_HEADER_TIMEOUT_S:g}); then the connection is closed")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="seconds a client has to send a request's body after its headers "
                             f"(default {DEFAULT_BODY_TIMEOUT_S:g}); then 408")
    parser.add_argument("--engine-in-process", action="store_true",
                        help="run the engine on a thread of the HTTP server's process instead "
                             "of a process of its own (docs/server.md, Process layout)")
    parser.add_argument("--tool-call-parser", default="auto", choices=["auto", *PARSERS],
                        help="the format of the model's tool calls (default auto: chosen from "
                             "its chat template; docs/server.md, Tool calling)")
    parser.add_argument("--no-ui", dest="ui", action="store_false",
                        help="do not serve the chat page at / (served by default)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    ray = parser.add_argument_group("Ray Serve replicas (docs/scaling.md; pip install -e "
                                    "'.[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve engine replicas on Ray Serve behind its HTTP proxy")
    ray.add_argument("--replicas", type=int, default=None,
                     help="engine replicas (default 1 unless --autoscaling-config)")
    ray.add_argument("--autoscaling-config", type=json.loads, default=None, metavar="JSON",
                     help="Ray Serve's autoscaling_config for the engine replicas, e.g. "
                          "'{\"min_replicas\": 1, \"max_replicas\": 4}'")
    ray.add_argument("--routing", default="affinity", choices=["affinity", "random"],
                     help="keep a conversation on the replica holding its KV (default), or "
                          "Ray's power-of-two choices")
    ray.add_argument("--max-ongoing-requests", type=int, default=None,
                     help="requests one replica takes before it counts as full (default: "
                          "--max-num-seqs)")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (default: start one on this machine)")
    ray.add_argument("--ray-metrics-port", type=int, default=None,
                     help="port of the started cluster's Prometheus endpoint, where each "
                          "replica's ray_jvt_* gauges are (default: Ray's choice)")
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags (also used by bench/serve.py); ``engine_options`` reads them."""
    engine = parser.add_argument_group("engine (jvt.EngineConfig; default: the engine's)")
    for flag, kind, help_text in ENGINE_FLAGS:
        engine.add_argument(flag, type=kind, default=None, help=help_text)
    engine.add_argument("--enable-prefix-sharing", action=argparse.BooleanOptionalAction,
                        default=None, help="share the KV of common prompt prefixes")
    engine.add_argument("--tensor-parallel", type=int, default=1,
                        help="devices to split the model over")


def engine_options(args: argparse.Namespace) -> dict:
    """Engine keyword arguments from the flags that were given."""
    opts = {}
    for flag, _, _ in ENGINE_FLAGS:
        name = flag[2:].replace("-", "_")
        value = getattr(args, name)
        if value is not None:
            opts[name] = tuple(int(v) for v in value.split(",")) if name.endswith(
                "_buckets") else value
    if args.enable_prefix_sharing is not None:
        opts["enable_prefix_sharing"] = args.enable_prefix_sharing
    if args.tensor_parallel != 1:
        opts["tensor_parallel"] = args.tensor_parallel
    if opts.get("device", "cpu") != "cpu":
        opts.setdefault("dtype", "bfloat16")
    return opts


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean shutdown, 2 for bad options, 1 when the
    engine process died."""
    from jvt.config import make_config
    from jvt.server.api_server import create_app, serve
    from jvt.server.bridge import EngineBridge
    from jvt.server.engine_client import EngineClient
    from jvt.server.metrics import ServerMetrics

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.model is None:
        from jvt.models import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    try:
        opts = engine_options(args)
        config = make_config(**opts)
        max_queue = args.max_queue if args.max_queue is not None else \
            QUEUE_PER_SLOT * config.max_num_seqs
        if max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
        if args.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
        for flag in ("header_timeout", "body_timeout"):
            if not getattr(args, flag) > 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be > 0 seconds, got "
                                 f"{getattr(args, flag)}")
        _check_ray_flags(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.served_model_name or [args.model]
    if args.ray:
        return _run_ray(args, opts, names, max_queue)
    bridge = None
    metrics = ServerMetrics(names[0], lambda: bridge.stats, lambda: bridge.unfinished)
    if args.engine_in_process:
        import jvt

        bridge = EngineBridge(lambda: jvt.Engine(args.model, **opts), max_queue=max_queue,
                              on_finish=metrics.observe)
    else:
        bridge = EngineClient(args.model, opts, max_queue=max_queue, on_finish=metrics.observe,
                              log_level=args.log_level)
    t0 = time.perf_counter()
    try:
        bridge.start()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = logging.getLogger("jvt.server")
    log.info(
        "engine ready in %.1f s (%s, max_model_len %d, %d slots, up to %d unfinished requests, "
        "%s)", time.perf_counter() - t0, args.model, bridge.config.max_model_len,
        bridge.config.max_num_seqs, bridge.max_pending,
        "in this process" if args.engine_in_process else f"engine process pid {bridge.pid}")
    app = create_app(bridge, served_names=names, root=args.model, metrics=metrics,
                     api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                     body_timeout_s=args.body_timeout, ui=args.ui,
                     tool_parser=None if args.tool_call_parser == "auto" else args.tool_call_parser)
    if args.ui:
        log.info("chat page: http://%s:%d/", args.host, args.port)
    try:
        serve(app, bridge, host=args.host, port=args.port, log_level=args.log_level,
              header_timeout_s=args.header_timeout)
    finally:
        bridge.stop()
    return 1 if bridge.died else 0


RAY_ONLY = ("replicas", "autoscaling_config", "max_ongoing_requests", "ray_address",
            "ray_metrics_port")


def _check_ray_flags(args: argparse.Namespace) -> None:
    if not args.ray:
        given = [f"--{n.replace('_', '-')}" for n in RAY_ONLY if getattr(args, n) is not None]
        if given or args.routing != "affinity":
            raise ValueError(f"{', '.join(given) or '--routing'} needs --ray")
        return
    if args.engine_in_process:
        raise ValueError("--engine-in-process and --ray exclude each other (each replica runs "
                         "its engine on a thread of its own process)")
    if args.header_timeout != DEFAULT_HEADER_TIMEOUT_S:
        raise ValueError("--header-timeout does not apply with --ray (Ray Serve's proxy reads "
                         "the headers)")
    if args.ray_address is not None and args.ray_metrics_port is not None:
        raise ValueError("--ray-metrics-port is for the cluster --ray starts, not one joined "
                         "with --ray-address (its metrics port is set where it was started)")
    if args.replicas is not None and args.autoscaling_config is not None:
        raise ValueError("give --replicas or --autoscaling-config, not both")
    if args.autoscaling_config is not None and not isinstance(args.autoscaling_config, dict):
        raise ValueError("--autoscaling-config must be a JSON object")


def _run_ray(args: argparse.Namespace, opts: dict, names: list[str], max_queue: int) -> int:
    from jvt.server import ray_serve

    try:
        app = ray_serve.build_app(
            args.model, opts, autoscaling=args.autoscaling_config,
            replicas=None if args.autoscaling_config else (
                1 if args.replicas is None else args.replicas),
            max_queue=max_queue, routing=args.routing,
            max_ongoing_requests=args.max_ongoing_requests,
            app_options={"served_names": names, "root": args.model, "api_key": args.api_key,
                         "max_request_bytes": args.max_request_bytes,
                         "body_timeout_s": args.body_timeout, "ui": args.ui,
                         "tool_parser": None if args.tool_call_parser == "auto"
                         else args.tool_call_parser})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return ray_serve.run(app, host=args.host, port=args.port, address=args.ray_address,
                         metrics_port=args.ray_metrics_port)

