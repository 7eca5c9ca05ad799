"""`sdrt serve`: one engine dir behind the APIs clients already speak (FastAPI on uvicorn; Ray Serve to
scale out). Routes:

    sdrt     POST /generate (JSON with the Python API's keywords), GET /info
    OpenAI   POST /v1/images/generations, POST /v1/images/edits, GET /v1/models
    A1111    /sdapi/v1/txt2img, img2img, samplers, schedulers, sd-models, options, progress, interrupt, png-info
    ops      GET /health (live), GET /ready (engines warm), GET /metrics (Prometheus text), /docs (OpenAPI)

Requests queue (bounded: 429 with Retry-After when full) for one worker that batches the compatible
ones; see sdrt.serve.scheduler. Needs the `serve` extra (fastapi, uvicorn, prometheus-client,
python-multipart; ray[serve] for --ray).
"""

from sdrt.serve.app import ServeConfig, Service, create_app
from sdrt.serve.inputs import parse_request, request_fields
from sdrt.serve.run import listen, run, server

__all__ = ["ServeConfig", "Service", "create_app", "listen", "parse_request", "request_fields", "run", "server"]
