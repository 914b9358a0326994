"""The FastAPI app: routes, request parsing and error handlers (every error is the OpenAI
body, 400 for invalid requests), the OpenAPI schema as the server really answers, and the
request guard in front of it all (API key, body size, body timeout: ``limits``)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import pathlib
import signal

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, RootModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

import jvt
from jvt.server.bridge import EngineDeadError, EngineFront
from jvt.server.errors import APIError
from jvt.server.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_REQUEST_BYTES,
    OPEN_PATHS,
    RequestGuard,
    json_error,
    timed_h11,
)
from jvt.server.metrics import ServerMetrics
from jvt.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from jvt.server.serving import ServingContext, json_response
from jvt.server.serving_chat import ChatServing
from jvt.server.serving_completion import CompletionServing
from jvt.server.serving_tokenize import TokenizeServing

log = logging.getLogger("jvt.server")


ERROR_STATUSES = {400: "invalid request", 401: "invalid or missing API key",
                  404: "unknown model or route", 408: "request body not received in time",
                  413: "request body too large", 500: "the engine failed",
                  503: "server busy (Retry-After) or the engine is not running"}


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


def _streamed(chunk) -> dict:
    """A 200 that is JSON, or with ``stream: true`` server-sent events of ``chunk``."""
    event = {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": f"a JSON {chunk.__name__}, an error body, "
                                                  f"or [DONE] (the last event)"},
        "event": {"type": "string"}}}
    return {200: {"description": f"the response, or (stream: true) server-sent events of "
                                 f"{chunk.__name__} ending with `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": event}}}}


GENERATE_ERRORS = (400, 401, 404, 408, 413, 500, 503)


def create_app(bridge: EngineFront, *, served_names: list[str], root: str,
               metrics: ServerMetrics, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, ui: bool = True,
               tool_parser: str | None = None) -> FastAPI:
    """The app in front of a started ``bridge``.

    served_names: model names requests may give (the first is the default); root: what
    --model named; api_key: when set, every route but OPEN_PATHS (/health, /version,
    /metrics) needs ``Authorization: Bearer <api_key>``, /docs and /openapi.json included;
    max_request_bytes, body_timeout_s: see ``limits.RequestGuard``; ui: serve the chat page
    (``ui/``) at / (without the key: it holds no data, and calls the API with the key the user
    enters); tool_parser: the tool-call format (jvt.tools.PARSERS; None: the chat template's).
    """
    app = FastAPI(title="jvt", version=jvt.__version__)
    ctx = ServingContext(bridge, served_names, root, tool_parser)
    completions, chat, tokens = CompletionServing(ctx), ChatServing(ctx), TokenizeServing(ctx)
    _install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_request_bytes=max_request_bytes,
                       body_timeout_s=body_timeout_s,
                       open_paths=OPEN_PATHS | UI_PATHS if ui else OPEN_PATHS)  # page: no data
    if ui:
        _add_ui(app)

    @app.get("/health", response_class=Response,
             responses={200: {"description": "the engine is running (empty body)"},
                        **_errors(503)})
    async def health() -> Response:
        if bridge.alive:
            return Response(status_code=200)
        return _error(APIError(503, "the engine is not running"))

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": jvt.__version__}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text exposition",
              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def models() -> Response:
        cards = [ModelCard(id=name, root=root, max_model_len=ctx.max_model_len)
                 for name in served_names]
        return json_response(ModelList(data=cards))

    @app.post("/v1/completions", response_model=CompletionResponse,
              openapi_extra=_body(CompletionRequest),
              responses={**_streamed(CompletionResponse), **_errors(*GENERATE_ERRORS)})
    async def create_completion(raw: Request) -> Response:
        return await completions.create(await _parse(raw, CompletionRequest), raw)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              openapi_extra=_body(ChatCompletionRequest),
              responses={**_streamed(ChatCompletionChunk), **_errors(*GENERATE_ERRORS)})
    async def create_chat_completion(raw: Request) -> Response:
        return await chat.create(await _parse(raw, ChatCompletionRequest), raw)

    @app.post("/tokenize", response_model=TokenizeResponse, openapi_extra=_body(TokenizeRequest),
              responses=_errors(400, 401, 404, 408, 413))
    async def tokenize(raw: Request) -> Response:
        """The token ids of a prompt or of chat messages (vLLM's /tokenize)."""
        out = await tokens.tokenize(await _parse(raw, TokenizeRequest))
        return json_response(out)

    @app.post("/detokenize", response_model=DetokenizeResponse,
              openapi_extra=_body(DetokenizeRequest), responses=_errors(400, 401, 404, 408, 413))
    async def detokenize(raw: Request) -> Response:
        """The text of token ids (vLLM's /detokenize; special tokens skipped)."""
        out = await tokens.detokenize(await _parse(raw, DetokenizeRequest))
        return json_response(out)

    @app.get("/engine/stats", responses=_errors(401, 500))
    async def engine_stats() -> dict:
        """engine.stats() now (debug: KV chunks, slots, queue lengths)."""
        return await _on_engine(bridge, "stats")

    @app.post("/reset_prefix_cache", response_class=Response,
              responses={200: {"description": "done (empty body)"}, **_errors(401, 500)})
    async def reset_prefix_cache() -> Response:
        """Release the retained slots of finished requests (engine.free_cache())."""
        await _on_engine(bridge, "free_cache")
        return Response(status_code=200)

    app.openapi = lambda: _openapi(app, secured=api_key is not None)
    return app


UI_DIR = pathlib.Path(__file__).parent / "ui"
UI_TYPES = {"index.html": "text/html; charset=utf-8",
            "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
            "icon.svg": "image/svg+xml"}
UI_PATHS = frozenset({"/", *(f"/ui/{name}" for name in UI_TYPES if name != "index.html")})
# Only this origin's files and API: no inline script, no external fetch, no framing.
UI_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
             "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _add_ui(app: FastAPI) -> None:
    """GET / (the page) and /ui/<its files>, read once, with a strict CSP."""
    files = {name: (UI_DIR / name).read_bytes() for name in UI_TYPES}
    headers = {"Content-Security-Policy": UI_POLICY, "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache"}

    def route(path: str, name: str) -> None:
        async def page() -> Response:
            return Response(files[name], media_type=UI_TYPES[name], headers=headers)
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    for path in UI_PATHS:
        route(path, "index.html" if path == "/" else path.removeprefix("/ui/"))


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


def _body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


PARSE_INLINE_BYTES = 64 * 2**10  # larger bodies are parsed on a worker thread


async def _parse(raw: Request, model: type[BaseModel]):
    """The request body as ``model``; 400 naming the field otherwise. A large body (up to
    ``--max-request-bytes``: ~25 ms for the 350k token ids of 1 MiB) is parsed on a worker thread, where the
    interpreter hands the event loop the GIL in between, so /health is not held up."""
    body = await raw.body()
    if len(body) <= PARSE_INLINE_BYTES:
        return _validate(body, model)
    return await asyncio.to_thread(_validate, body, model)


def _validate(body: bytes, model: type[BaseModel]):
    """Parsed and validated in one pass. The one-pass parser refuses lone surrogates (and NaN /
    Infinity) as invalid JSON, so invalid JSON is parsed once more by the standard library's
    parser, which takes them, to name the field that holds one. A RootModel is a tagged union
    of request forms: its errors' locations start with the tag, which names no field."""
    tagged = issubclass(model, RootModel)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:  # keep only the message: ``e`` holds the whole body
        message, param, kind = _validation_error(e, tagged)
    if kind == "json_invalid":
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if data is not None:
            try:
                return model.model_validate(data)
            except ValidationError as e:
                message, param, _ = _validation_error(e, tagged)
    raise APIError(400, message, param)


def _validation_error(e: ValidationError, tagged: bool = False
                      ) -> tuple[str, str | None, str | None]:
    """(message, the top-level field at fault, the first error's type) of a pydantic error;
    tagged: the locations start with a union tag (dropped)."""
    errors = e.errors(include_input=False, include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": None}
    # A union reports one error per alternative; the telling one is from an alternative whose
    # type matched ("stop": ["x\udc00"] is a list with a bad string, not "not a string").
    same_field = [x for x in errors if x["loc"][:1] == first["loc"][:1]]
    first = next((x for x in same_field if not x["type"].endswith("_type")), first)
    loc = [str(p) for p in first.get("loc", ())[int(tagged):] if "[" not in str(p)]
    if first.get("type") == "json_invalid":  # loc is a position in the body, not a field
        loc = []
    where = ".".join(loc)
    text = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators
    if first.get("type") == "extra_forbidden":
        text = "unknown field: this server refuses fields it does not implement rather than " \
               "ignore them (docs/server.md lists the accepted fields)"
    message = f"{where}: {text}" if where else text
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return message, (loc[0] if loc else None), first.get("type")


def _openapi(app: FastAPI, secured: bool) -> dict:
    """FastAPI's schema with the request models (parsed by ``_parse``, not by FastAPI),
    without the 422 FastAPI adds to routes with parameters (this server answers 400), with
    the bearer key on every route that needs it."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path, ops in schema["paths"].items():
        for op in ops.values():
            op["responses"].pop("422", None)
            if secured and path not in OPEN_PATHS:
                op["security"] = [{"bearer": []}]
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for model in REQUEST_MODELS:
        request = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(request.pop("$defs", {}))
        schemas[model.__name__] = request
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = schema
    return schema


async def _on_engine(bridge: EngineFront, name: str):
    try:
        return await asyncio.wrap_future(bridge.call(name))
    except EngineDeadError as e:
        raise APIError(500, str(e)) from None


def _json(status: int, message: str, param: str | None = None,
          headers: dict[str, str] | None = None) -> Response:
    body, _ = json_error(status, message, param)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _error(e: APIError) -> Response:
    return _json(e.status, e.message, e.param, e.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(raw: Request, e: APIError) -> Response:
        return _error(e)

    @app.exception_handler(HTTPException)
    async def http_error(raw: Request, e: HTTPException) -> Response:
        return _json(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(raw: Request, e: Exception) -> Response:
        log.exception("unhandled error in %s %s", raw.method, raw.url.path)
        return _json(500, f"internal error: {e!r}")


class _Server(uvicorn.Server):
    """uvicorn's server, except that a shutdown signal first aborts every request (open streams
    end now instead of after their last token) and is not re-raised once the server has shut
    down (uvicorn re-raises it, which would make the exit status -SIGTERM instead of 0). It
reads the engine's outputs on its event loop, and shuts down when the engine process dies."""

    def __init__(self, config: uvicorn.Config, bridge: EngineFront):
        super().__init__(config)
        self.bridge = bridge

    async def serve(self, sockets=None) -> None:
        self.bridge.attach(asyncio.get_running_loop())
        self.bridge.on_dead = self._engine_gone
        await super().serve(sockets)

    def _engine_gone(self) -> None:
        """The engine process died: shut down (``run`` then exits 1)."""
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for connections
        self.should_exit = True
        self.bridge.abort_all()


def serve(app: FastAPI, bridge: EngineFront, *, host: str, port: int, log_level: str,
          header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM (returns after a clean shutdown).
    header_timeout_s: see ``limits.timed_h11``.

    What start-up built (the model, JAX's caches: ~180k objects) is frozen out of the garbage
    collector first: a full collection then scans only what serving allocates, instead of
    pausing every thread for ~100 ms (seen as /health taking 125 ms now and then)."""
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=10, http=timed_h11(header_timeout_s))
    _Server(config, bridge).run()
