"""``jvt serve --ray``: engine replicas on Ray Serve behind the server's own FastAPI app
(docs/scaling.md, "Replicas on Ray Serve").

Two deployments of one Serve application:

- ``APIServer`` (the ingress, one replica by default): ``api_server.create_app`` over a
  ``ServeFront``, so every route, validation rule, chat template, tool parser and error body is
  the single server's. It tokenizes and sends token ids to an engine replica through a
  DeploymentHandle, one streaming call per HTTP request.
- ``EngineReplica`` (``--replicas N`` or Ray Serve's autoscaling): one ``jvt.Engine`` on an
  ``EngineBridge`` thread each; it detokenizes and applies stop strings, and streams batches of
  ``Update`` back, one message per engine step of the request.

Routing: the ingress names each request's conversation (``serving.affinity_key``: the
X-Session-Id header, the ``user`` field, or a hash of the conversation's start) as the call's
Serve ``session_id``; ``AffinityRouter`` (Ray's consistent-hash router) sends a session to the
replica that holds its KV, and to the least loaded other replica when that one is full
(``max_ongoing_requests``) or gone. ``routing="random"`` uses Ray's default power-of-two router
and no key (the benchmark's baseline).

Health: Ray Serve calls ``EngineReplica.check_health``, which fails once the engine thread
has died, and replaces the replica. A request whose replica dies before it was accepted is
retried once on another; one that dies later ends with an error (HTTP 500 or an error chunk).
Metrics: each replica exports ``ray_jvt_*`` gauges through Ray's Prometheus endpoint (labelled
with its replica id); the ingress's /metrics has the request counters and histograms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable

from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.handle import DeploymentHandle

from jvt.config import EngineConfig
from jvt.server.bridge import (
    EngineBridge,
    EngineDeadError,
    EngineFront,
    InvalidRequestError,
    Prompt,
    QueueFullError,
    RequestFailedError,
    Submission,
    resolve,
)
from jvt.server.errors import APIError
from jvt.server.metrics import ServerMetrics, kv_usage
from jvt.types import RequestOutput, SamplingParams

log = logging.getLogger("jvt.server")
APP_NAME = "jvt"
METRICS_INTERVAL_S = 1.0  # how often a replica refreshes its Ray gauges
GAUGES = (  # name, help, value from (engine.stats(), unfinished requests)
    ("jvt_num_requests_running", "Requests in the running batch.",
     lambda s, _: s.get("running", 0)),
    ("jvt_num_requests_waiting", "Requests waiting to be scheduled.",
     lambda s, _: s.get("waiting", 0)),
    ("jvt_num_requests_unfinished", "Requests the replica holds.", lambda _, u: u),
    ("jvt_kv_cache_usage_perc", "Fraction of the KV budget's chunks in use.",
     lambda s, _: kv_usage(s)),
    ("jvt_requests_received", "Engine requests this replica received.",
     lambda s, _: s.get("requests_received", 0)),
    ("jvt_num_preemptions", "Preemptions (swap or recompute).",
     lambda s, _: s.get("preemptions", 0)))


class AffinityRouter(ConsistentHashRouter):
    """Ray Serve's consistent-hash router (requests with one session_id go to one replica,
    replicas agree without talking), with the fallback changed: when that replica is full or
    gone, the least loaded of the others (Ray probes their queue lengths) instead of the next
    one on the ring. A request without a session_id hashes its own request id (uniform)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        if not ranks:
            return ranks
        first = ranks[0][0]
        rest = [r for r in candidate_replicas if r.replica_id != first.replica_id]
        return [[first], rest] if rest else [[first]]


class EngineReplica:
    """One Engine of the deployment (the class Ray Serve instantiates per replica).
    model, opts: ``jvt.Engine(model, **opts)``; max_queue: requests it queues beyond its slots."""

    async def __init__(self, model: str, opts: dict, max_queue: int):
        import jvt

        self.bridge = EngineBridge(lambda: jvt.Engine(model, **opts), max_queue=max_queue)
        await asyncio.to_thread(self.bridge.start)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._gauges = _replica_gauges()
        self._metrics_task = asyncio.get_running_loop().create_task(self._export())

    def info(self) -> EngineConfig:
        return self.bridge.config

    def check_health(self) -> None:
        """Ray Serve's health check: fails once the engine thread has stopped."""
        if not self.bridge.alive:
            raise RuntimeError("the engine thread has stopped")

    async def generate(self, items: list[tuple[Prompt, SamplingParams]]):
        """Run one submission; yields ("accepted", replica id) then ("updates", [Update]) per
        engine step with new output, or one ("invalid", index, message) / ("failed", message) /
        ("busy", message) / ("dead", message). Cancelled (the client went away): abort."""
        try:
            sub = self.bridge.submit(items)
        except QueueFullError as e:
            yield ("busy", str(e))
            return
        except EngineDeadError as e:
            yield ("dead", str(e))
            return
        open_ = len(items)
        try:
            try:
                await asyncio.wrap_future(sub.accepted)
            except InvalidRequestError as e:
                open_ = 0
                yield ("invalid", e.index, str(e))
                return
            except (RequestFailedError, EngineDeadError) as e:
                open_ = 0
                yield ("failed", str(e))
                return
            yield ("accepted", self.replica_id)
            while open_:
                batch = [await sub.updates.get()]
                while not sub.updates.empty():
                    batch.append(sub.updates.get_nowait())
                for item in batch:
                    if isinstance(item, EngineDeadError):
                        open_ = 0
                        yield ("dead", str(item))
                        return
                    if item.output is not None:
                        open_ -= 1
                yield ("updates", batch)
        finally:
            if open_:
                self.bridge.abort(sub)

    async def _export(self) -> None:
        while True:
            s, unfinished = self.bridge.stats, self.bridge.unfinished
            for (_, _, value), gauge in zip(GAUGES, self._gauges, strict=True):
                gauge.set(value(s, unfinished))
            await asyncio.sleep(METRICS_INTERVAL_S)

    def __del__(self):
        self.bridge.stop()


def _replica_gauges() -> list:
    from ray.serve.metrics import Gauge

    return [Gauge(name, description=doc) for name, doc, _ in GAUGES]


class ServeFront(EngineFront):
    """EngineFront over the EngineReplica deployment: what ``create_app`` needs, in the
    ingress. One streaming handle call per submission. engine: the deployment's handle;
    replicas: the most replicas (the bound on unfinished requests is that many engines'); the
    rest as EngineFront."""

    def __init__(self, engine: DeploymentHandle, tokenizer, config, *, replicas: int,
                 max_queue: int, affinity: bool,
                 on_finish: Callable[[RequestOutput], None] | None = None):
        super().__init__(max_queue=max_queue, on_finish=on_finish)
        self._engine = engine
        self.routes = affinity
        self._started(tokenizer, config)
        self.max_pending = replicas * (config.max_num_seqs + max_queue)
        self._open: dict[Submission, asyncio.Task] = {}
        self.replicas: Counter[str] = Counter()  # replica id -> engine requests it finished

    @property
    def alive(self) -> bool:
        return not self._closing

    def submit(self, items: list[tuple[Prompt, SamplingParams]],
               affinity: str | None = None) -> Submission:
        """Send ``items`` to an engine replica (the one ``affinity`` names, when routing by
        affinity); await ``accepted`` next."""
        self._reserve(len(items))
        sub = Submission(items)
        sub.left = len(items)  # choices not finished (their slots in the bound are held)
        task = sub.loop.create_task(self._run(sub, affinity))
        self._open[sub] = task
        task.add_done_callback(lambda _: self._open.pop(sub, None))
        return sub

    async def _run(self, sub: Submission, key: str | None) -> None:
        try:
            for attempt in (0, 1):
                try:
                    await self._stream(sub, key or "")
                    return
                except RayError as e:
                    if sub.accepted.done() or attempt:  # output may have gone out: no retry
                        raise EngineDeadError(f"the engine replica failed: {e}") from None
                    log.warning("an engine replica failed before accepting a request (%s): "
                                "retrying", type(e).__name__)
        except EngineDeadError as e:
            self._fail(sub, e)
        except asyncio.CancelledError:  # abort(): the call is cancelled on the replica too
            self._fail(sub, EngineDeadError("the request was aborted"))
        finally:
            self._release(sub.left)

    async def _stream(self, sub: Submission, key: str) -> None:
        """One replica call: its messages onto ``sub``."""
        call = self._engine.options(stream=True, session_id=key).generate.remote(sub.items)
        replica = None
        try:
            async for msg in call:
                kind = msg[0]
                if kind == "accepted":
                    replica = msg[1]
                    resolve(sub.accepted)
                elif kind == "updates":
                    for update in msg[1]:
                        if update.output is not None:
                            sub.left -= 1
                            self.replicas[replica] += 1
                            self._finished(update.output)
                        sub.updates.put_nowait(update)
                else:
                    error = _refusal(msg)
                    if sub.accepted.done():
                        raise EngineDeadError(f"the engine replica failed: {error}")
                    resolve(sub.accepted, error)
                    return
        finally:
            if sub.left:
                call.cancel()

    @staticmethod
    def _fail(sub: Submission, error: EngineDeadError) -> None:
        if sub.accepted.done():
            sub.updates.put_nowait(error)
        else:
            resolve(sub.accepted, error)

    def abort(self, sub: Submission, index: int | None = None) -> None:
        """Abort every choice of ``sub``: cancelling the call cancels it on the replica."""
        task = self._open.pop(sub, None)
        if task is not None:
            task.cancel()

    def abort_all(self) -> None:
        self._closing = True
        for task in list(self._open.values()):
            task.get_loop().call_soon_threadsafe(task.cancel)

    def call(self, name: str) -> concurrent.futures.Future:
        """"stats": the engine requests each replica has finished for this ingress (each
        replica's engine.stats() is in its ray_jvt_* gauges). Other engine calls act on one
        engine and are refused: each replica holds its own cache."""
        fut = concurrent.futures.Future()
        if name == "stats":
            fut.set_result({"replicas": dict(self.replicas)})
        else:
            fut.set_exception(APIError(400, f"'{name}' acts on one engine; with --ray every "
                                            f"replica keeps its own (not supported)"))
        return fut


def _refusal(msg: tuple) -> Exception:
    """The error of a replica's message that ends a call before or instead of output."""
    kind = msg[0]
    if kind == "invalid":
        return InvalidRequestError(msg[1], msg[2])
    return {"failed": RequestFailedError, "busy": QueueFullError,
            "dead": EngineDeadError}[kind](msg[1])


@serve.ingress()
class APIServer:
    """The ingress deployment: the server's FastAPI app over a ServeFront."""

    async def __init__(self, engine: DeploymentHandle, model: str, *, replicas: int,
                       max_queue: int, affinity: bool, app_options: dict):
        from jvt.models import load_tokenizer

        config = await engine.info.remote()
        tokenizer = await asyncio.to_thread(load_tokenizer, model)
        names = app_options["served_names"]
        self.metrics = ServerMetrics(names[0], None, lambda: self.front.unfinished)
        self.front = ServeFront(engine, tokenizer, config, replicas=replicas,
                                max_queue=max_queue, affinity=affinity,
                                on_finish=self.metrics.observe)
        self.app_options = app_options

    def __serve_build_asgi_app__(self):
        from jvt.server.api_server import create_app

        return create_app(self.front, metrics=self.metrics, **self.app_options)


def build_app(model: str, opts: dict, *, replicas: int | None, max_queue: int,
              app_options: dict, autoscaling: dict | None = None, routing: str = "affinity",
              max_ongoing_requests: int | None = None, actor_options: dict | None = None):
    """The Serve application: ``replicas`` EngineReplica (or ``autoscaling``, Ray Serve's
    autoscaling_config) behind one APIServer. app_options: create_app's keywords but
    ``metrics``; max_ongoing_requests: calls one replica takes before the router counts it
    full (default: its max_num_seqs); actor_options: the replicas' ray_actor_options (default
    one CPU, or ``tensor_parallel`` GPUs when the device is CUDA)."""
    from jvt.config import make_config

    if routing not in ("affinity", "random"):
        raise ValueError(f"routing must be 'affinity' or 'random', got {routing!r}")
    if (replicas is None) == (autoscaling is None):
        raise ValueError("give exactly one of replicas and autoscaling")
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if max_ongoing_requests is not None and max_ongoing_requests < 1:
        raise ValueError(f"--max-ongoing-requests must be >= 1, got {max_ongoing_requests}")
    config = make_config(**opts)
    if actor_options is None:
        gpus = config.tensor_parallel if config.device.startswith("cuda") else 0
        actor_options = {"num_gpus": gpus} if gpus else {"num_cpus": 1}
    engine_options = {"ray_actor_options": actor_options,
                      "max_ongoing_requests": max_ongoing_requests or config.max_num_seqs}
    if autoscaling is not None:
        engine_options["autoscaling_config"] = autoscaling
        most = autoscaling.get("max_replicas", 1)
    else:
        engine_options["num_replicas"] = most = replicas
    if routing == "affinity":
        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class=AffinityRouter,
            request_router_kwargs={"num_fallback_replicas": 0})
    engine = serve.deployment(EngineReplica, name="EngineReplica", **engine_options)
    api = serve.deployment(APIServer, name="APIServer", ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=most * (config.max_num_seqs + max_queue))
    return api.bind(engine.bind(model, opts, max_queue), model, replicas=most,
                    max_queue=max_queue, affinity=routing == "affinity",
                    app_options=app_options)


def run(app, *, host: str, port: int, address: str | None,
        metrics_port: int | None = None) -> int:
    """Start (or join, ``address``) a Ray cluster, serve ``app`` on host:port until SIGINT /
    SIGTERM, then shut Serve down (and the cluster this call started); 0. metrics_port: the
    started cluster's Prometheus endpoint."""
    import ray

    extra = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
    ray.init(address=address, include_dashboard=False, configure_logging=False, **extra)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d/ (Ray Serve)", host, port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
