"""The FastAPI app: routes, API-key check and error handlers (every error is the OpenAI body,
400 instead of FastAPI's 422 for invalid requests)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import jvt
from jvt.server.bridge import EngineBridge, EngineDeadError
from jvt.server.errors import APIError, error_body
from jvt.server.metrics import ServerMetrics
from jvt.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from jvt.server.serving import ServingContext
from jvt.server.serving_chat import ChatServing
from jvt.server.serving_completion import CompletionServing

log = logging.getLogger("jvt.server")


def create_app(bridge: EngineBridge, *, served_names: list[str], root: str,
               metrics: ServerMetrics, api_key: str | None = None) -> FastAPI:
    """The app in front of a started ``bridge``.

    served_names: model names requests may give (the first is the default); root: what
    --model named; api_key: when set, every route but /health, /version and /metrics needs
    ``Authorization: Bearer <api_key>``.
    """
    app = FastAPI(title="jvt", version=jvt.__version__)
    ctx = ServingContext(bridge, served_names, root)
    completions, chat = CompletionServing(ctx), ChatServing(ctx)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if bridge.alive:
            return Response(status_code=200)
        return _error(APIError(503, "the engine is not running"))

    @app.get("/version")
    async def version() -> dict:
        return {"version": jvt.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    api = APIRouter(dependencies=[Depends(_api_key_check(api_key))])

    @api.get("/v1/models")
    async def models() -> Response:
        cards = [ModelCard(id=name, root=root, max_model_len=ctx.max_model_len)
                 for name in served_names]
        return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")

    @api.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request) -> Response:
        return await completions.create(req, raw)

    @api.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(req, raw)

    @api.get("/engine/stats")
    async def engine_stats() -> dict:
        """engine.stats() now (debug: KV chunks, slots, queue lengths)."""
        return await _on_engine(bridge, lambda engine: engine.stats())

    @api.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        """Release the retained slots of finished requests (engine.free_cache())."""
        await _on_engine(bridge, lambda engine: engine.free_cache())
        return Response(status_code=200)

    app.include_router(api)
    return app


async def _on_engine(bridge: EngineBridge, fn):
    try:
        return await asyncio.wrap_future(bridge.call(fn))
    except EngineDeadError as e:
        raise APIError(500, str(e)) from None


def _api_key_check(api_key: str | None):
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(raw: Request) -> None:
        if expected is None:
            return
        given = raw.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)")

    return check


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body().model_dump(), status_code=e.status, headers=e.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(raw: Request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(raw: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":  # loc is a position in the body, not a field
            loc = []
        param = loc[0] if loc else None
        where = ".".join(loc)
        message = f"{where}: {first['msg']}" if where else first["msg"]
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error(s))"
        return JSONResponse(error_body(400, message, param).model_dump(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(raw: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, str(e.detail)).model_dump(),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(raw: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", raw.method, raw.url.path)
        return JSONResponse(error_body(500, f"internal error: {e!r}").model_dump(),
                            status_code=500)


class _Server(uvicorn.Server):
    """uvicorn's server, except that a shutdown signal first aborts every request (open streams
    end now instead of after their last token) and is not re-raised once the server has shut
    down (uvicorn re-raises it, which would make the exit status -SIGTERM instead of 0)."""

    def __init__(self, config: uvicorn.Config, bridge: EngineBridge):
        super().__init__(config)
        self.bridge = bridge

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for connections
        self.should_exit = True
        self.bridge.abort_all()


def serve(app: FastAPI, bridge: EngineBridge, *, host: str, port: int, log_level: str) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM (returns after a clean shutdown)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=10)
    _Server(config, bridge).run()
