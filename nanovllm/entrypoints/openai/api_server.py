"""The app: routes wired to the serving modules, one error mapping, the API key, and the uvicorn server with a
graceful shutdown. Holds no engine state: every request goes to the engine loop through AsyncLLM."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import importlib.metadata
import re
import socket

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nanovllm.core.logging import get_logger
from nanovllm.entrypoints.openai.metrics import ServerMetrics
from nanovllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                  TokenizeRequest, error_body)
from nanovllm.entrypoints.openai.serving_completions import OpenAIServingCompletion
from nanovllm.entrypoints.openai.serving_engine import ModelNotFound
from nanovllm.entrypoints.openai.serving_tokens import OpenAIServingTokens

logger = get_logger(__name__)
OPEN_PATHS = ("/health", "/metrics", "/version")  # answered without the API key (load balancers, Prometheus)
VERSION = importlib.metadata.version("nanovllm")


def build_app(llm, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `llm` (an AsyncLLM) as `model_name`."""
    app = FastAPI(title="nanovllm", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(llm.engine, model_name)
    completions = OpenAIServingCompletion(llm, model_name, metrics)
    tokens = OpenAIServingTokens(llm, model_name, metrics)  # chat completions too
    app.state.llm, app.state.metrics = llm, metrics
    add_error_handlers(app)
    if api_key:
        add_api_key_check(app, api_key)

    @app.get("/health")
    async def health() -> Response:
        if not llm.llm.loop.alive or llm.engine.closed_reason is not None:
            return JSONResponse(error_body("the engine is shut down", "ServiceUnavailableError", 503), 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": VERSION}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return tokens.models()

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict:
        return await tokens.tokenize_async(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict:
        return tokens.detokenize(request)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw: Request) -> Response:
        return await respond(raw, completions.create(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
        return await respond(raw, tokens.create(request))

    return app


async def respond(raw: Request, work) -> Response:
    """Run an endpoint's work until it is done or the client goes away (which cancels it: its requests are
    aborted and their blocks freed). A stream is relayed as server-sent events."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(wait_for_disconnect(raw))
    await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    disconnect.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)  # nobody reads it
    result = task.result()
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def add_error_handlers(app: FastAPI) -> None:
    """ValueError (a bad value, named by SamplingParams or the serving code) and malformed bodies -> 400 with the
    OpenAI error body; an unknown model -> 404; anything else -> 500 without a traceback."""
    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, e: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for error in e.errors():
            loc = [str(x) for x in error.get("loc", ()) if x != "body"]
            param = param or ".".join(loc) or None
            problems.append(f"{'.'.join(loc) or 'body'}: {error.get('msg')}")
        return JSONResponse(error_body("invalid request: " + "; ".join(problems), param=param), 400)

    @app.exception_handler(ValueError)
    async def invalid_value(_, e: ValueError) -> JSONResponse:
        named = re.match(r"(?:SamplingParams\.)?(\w+)=", str(e))
        return JSONResponse(error_body(str(e), param=named.group(1) if named else None), 400)

    @app.exception_handler(ModelNotFound)
    async def unknown_model(_, e: ModelNotFound) -> JSONResponse:
        return JSONResponse(error_body(str(e), "NotFoundError", 404, "model"), 404)

    @app.exception_handler(Exception)
    async def internal(_, e: Exception) -> JSONResponse:
        logger.error("request failed: %s: %s", type(e).__name__, e)
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", "InternalServerError", 500), 500)


def add_api_key_check(app: FastAPI, api_key: str) -> None:
    app.add_middleware(ApiKeyCheck, expected=f"Bearer {api_key}".encode())


class ApiKeyCheck:
    """401 unless `Authorization: Bearer <key>` (a plain ASGI middleware: streams and disconnects pass as they
    are)."""

    def __init__(self, app, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(error_body("invalid or missing API key: send 'Authorization: Bearer <key>'",
                                                   "AuthenticationError", 401), 401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for run_server; RuntimeError naming the address when it cannot be bound (in
    use, or not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not over a listener: only past TIME_WAITs
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "the port is in use (by another server?)" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise RuntimeError(f"cannot listen on {host}:{port}: {why}; choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def run_server(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               shutdown_timeout: float = 10.0, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM: then stop accepting, let in-flight requests finish for up to
    `shutdown_timeout` seconds, abort the rest, and return (the process exits 0). With `sock` (from bind_socket),
    serve on it; host and port are then only what the log says."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # the signal asked for this shutdown, which is done: exit 0

    config = uvicorn.Config(build_app(llm, model_name, api_key), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout, access_log=False)
    Server(config).run(sockets=[sock] if sock is not None else None)
