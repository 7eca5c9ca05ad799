"""The FastAPI app of `sdrt serve`: one engine dir behind sdrt's native API, the OpenAI Images API and
A1111's web UI API, with /health, /ready and /metrics. Routes hand checked GenerateRequests to the
Scheduler (sdrt.serve.scheduler) and wait for them, cancelling the work when the client leaves."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from sdrt.errors import InputError, SdrtError, first_line
from sdrt.serve.inputs import MAX_BODY, parse_request, request_fields, request_schema
from sdrt.serve.metrics import Metrics
from sdrt.serve.responses import error_response, png_b64
from sdrt.serve.scheduler import Cancelled, QueueFull, Scheduler, lower_priority

log = logging.getLogger("sdrt.serve")

BATCHING = ("queue", "continuous")
# how each cancellation reason answers; 499 is nginx's "client closed request" (nobody reads it)
CANCELLED_STATUS = {"deadline": 503, "interrupt": 409, "disconnect": 499, "shutdown": 503}


@dataclass
class ServeConfig:
    engines: Path
    provider: str = "cpu"
    max_images: int = 4  # per request
    max_queue: int = 16  # requests waiting; more get 429
    max_batch: int = 8  # images in one batched generation (continuous: running at once)
    batching: str = "queue"  # "queue": waiting requests batched; "continuous": joined at the next UNet call
    timeout: float = 600.0  # seconds from arrival to answer, per request
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    max_body: int = MAX_BODY
    body_timeout: float = 30.0
    warmup: bool = True
    model_name: str = field(default="")  # as /v1/models and /sdapi/v1/sd-models list it; default: the dir's name
    embeddings_dir: Path | None = None  # textual-inversion files prompts may name (A1111's embeddings folder)
    lora_dir: Path | None = None  # LoRA files prompts and `loras` may name (A1111's Lora folder)


class ClientGone(Exception):
    pass


class Service:
    """One Pipeline, its Scheduler and the metrics: what the routes share."""

    def __init__(self, config: ServeConfig):
        from sdrt.runtime.pipeline import Pipeline
        from sdrt.runtime.request import MAX_IMAGES

        if not 1 <= config.max_images <= MAX_IMAGES:
            raise InputError(f"--max-images must be from 1 to {MAX_IMAGES}, got {config.max_images}")
        if config.max_queue < 1 or config.max_batch < config.max_images:
            raise InputError(f"--max-queue must be at least 1 and --max-batch at least --max-images "
                             f"({config.max_images}); got {config.max_queue} and {config.max_batch}")
        self.config = config
        self.model_name = config.model_name or Path(config.engines).resolve().name
        self.pipe = Pipeline.load(config.engines, provider=config.provider)
        if config.embeddings_dir is not None:
            self.pipe.load_embeddings(config.embeddings_dir)
        self.pipe.set_lora_dir(config.lora_dir)
        self.metrics = Metrics()
        if config.batching not in BATCHING:
            raise InputError(f"--batching must be one of {', '.join(BATCHING)}, got {config.batching!r}")
        self.scheduler = Scheduler(self.pipe, config.max_queue, config.max_batch, config.timeout, self.metrics,
                                   continuous=config.batching == "continuous")
        self.ready = threading.Event()
        self.failed: str | None = None  # why the warm-up failed (/ready says it)

    def start(self) -> None:
        """Create the sessions in the background; /ready answers 200 once they are warm."""
        def warm():
            lower_priority()  # the engines' own threads, created here, inherit it
            try:
                if self.config.warmup:
                    self.pipe.warmup()
                self.ready.set()
            except Exception as e:  # noqa: BLE001 - /ready stays 503 and says why
                self.failed = first_line(e)
                log.error("warmup failed: %s", self.failed)

        threading.Thread(target=warm, name="sdrt-warmup", daemon=True).start()

    async def generate(self, req, http_request: Request, route: str):
        """Run REQ (a GenerateRequest) through the queue; returns (Result, Job). A random seed (-1, none)
        is picked by the pipeline's plan and named in Result.seeds."""
        if req.loras and self.config.lora_dir is None:
            raise InputError("loras: this server has no LoRA folder (sdrt serve --lora-dir DIR)")
        await asyncio.to_thread(self.pipe.plan, req)  # every check against the engine dir, before it queues
        timeout = _header_timeout(http_request)
        job = self.scheduler.submit(req, timeout)
        log.info("%s: %d image(s), %d steps, %r", route, req.num_images, req.steps, req.prompt[:200])
        future = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                try:
                    return future.result(), job
                except SdrtError:
                    raise
                except Exception as e:  # an engine or library failure: one line, and the server goes on
                    raise SdrtError(f"generation failed: {type(e).__name__}: {e}") from None
            if await http_request.is_disconnected():
                self.scheduler.cancel(job, "disconnect")
                raise ClientGone

    def close(self) -> None:
        self.scheduler.close()
        self.pipe.close()


def _header_timeout(request: Request) -> float | None:
    """X-Sdrt-Timeout: a client's own deadline in seconds (the server's --timeout still bounds it)."""
    value = request.headers.get("x-sdrt-timeout")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise InputError(f"X-Sdrt-Timeout: expected seconds > 0, got {value[:20]!r}")
    return seconds


def create_app(config: ServeConfig) -> FastAPI:
    """The ASGI app (uvicorn runs it; Ray Serve wraps it). The engines load here; sessions are created in
    the background once it starts."""
    from contextlib import asynccontextmanager

    from sdrt.serve import a1111, openai_api
    from sdrt.serve.guard import Guard

    service = Service(config)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await asyncio.to_thread(service.close)  # after uvicorn drained the requests in flight

    app = FastAPI(title="sdrt", summary="Stable Diffusion engines behind sdrt's, OpenAI's and A1111's APIs",
                  lifespan=lifespan)
    app.state.service = service
    _add_routes(app)
    app.include_router(openai_api.router)
    app.include_router(a1111.router)
    _add_error_handlers(app)
    if config.cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    routes = {r.path for router in (app, openai_api.router, a1111.router) for r in router.routes
              if hasattr(r, "path")}  # the metrics' route labels
    app.add_middleware(Guard, metrics=service.metrics, scheduler=service.scheduler, routes=routes,
                       api_key=config.api_key, max_body=config.max_body, body_timeout=config.body_timeout)
    return app


def _add_routes(app: FastAPI) -> None:
    @app.get("/health", tags=["operations"])
    async def health():
        """Live: the process answers (also while a generation runs)."""
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"])
    async def ready(request: Request):
        """Ready: the engines are loaded and warm (503 until then)."""
        s = request.app.state.service
        if s.ready.is_set():
            return {"status": "ready"}
        return JSONResponse({"status": "failed" if s.failed else "warming up", "error": s.failed}, status_code=503)

    @app.get("/metrics", tags=["operations"])
    def metrics(request: Request):
        """Prometheus text."""
        body, kind = request.app.state.service.metrics.text()
        return Response(body, media_type=kind)

    @app.get("/info", tags=["sdrt"])
    def info(request: Request):
        return _info(request.app.state.service)

    @app.post("/generate", tags=["sdrt"], openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": request_schema()}}}})
    async def generate(request: Request):
        """sdrt's native API: JSON with the Python API's keywords; base64 PNGs with A1111 metadata."""
        s = request.app.state.service
        req = parse_request(await request.body(), s.config.max_images)
        result, job = await s.generate(req, request, "/generate")
        return {"images": await png_b64(result), "seeds": result.seeds, "parameters": result.parameters,
                "seconds": round(time.monotonic() - job.started, 3),
                "queued_seconds": round(job.started - job.enqueued, 3)}


def _info(s: Service) -> dict:
    from sdrt.runtime import samplers

    m, c = s.pipe.manifest, s.config
    return {"engine_dir": str(c.engines), "model": s.model_name, "replica": f"{socket.gethostname()}:{os.getpid()}",
            "provider": s.pipe.provider, "provider_choice": s.pipe.provider_choice, "pipeline": m.pipeline,
            "source": m.source.get("name"), "prediction_type": m.prediction_type,
            "default_size": m.default_image_size, "max_images": c.max_images, "max_queue": c.max_queue,
            "max_batch": c.max_batch, "batching": c.batching,
            "samplers": list(samplers.SAMPLERS), "default_sampler": samplers.DEFAULT_SAMPLER,
            "fields": list(request_fields())}


def _add_error_handlers(app: FastAPI) -> None:
    def answer(request: Request, status: int, message: str, headers=None):
        return error_response(request.url.path, status, message, headers)

    @app.exception_handler(InputError)
    async def bad_input(request, e):
        return answer(request, 400, str(e))

    @app.exception_handler(QueueFull)
    async def queue_full(request, e):
        return answer(request, 429, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(Cancelled)
    async def cancelled(request, e):
        status = CANCELLED_STATUS[e.reason]
        return answer(request, status, str(e), {"Retry-After": "1"} if status == 503 else None)

    @app.exception_handler(ClientGone)
    async def client_gone(request, e):
        log.info("%s: the client left; its work was cancelled", request.url.path)
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return answer(request, e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        return answer(request, 400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(SdrtError)
    async def engine_error(request, e):
        log.error("%s failed: %s", request.url.path, first_line(e))
        return answer(request, 500, str(e))

    @app.exception_handler(Exception)
    async def failure(request, e):  # an engine or library failure: say what, keep serving
        log.error("%s failed: %s: %s", request.url.path, type(e).__name__, first_line(e))
        return answer(request, 500, f"generation failed: {type(e).__name__}: {e}")
