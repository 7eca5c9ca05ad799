"""`sdrt serve --ray`: the same FastAPI app on Ray Serve. Each replica builds its own app, so each holds
its own Pipeline and queue; Ray's HTTP proxy spreads requests over them and restarts a replica that
dies. Ray's autoscaling_config passes through as is.

On a cluster (`ray start --head` here, `ray start --address HEAD:6379` on each worker node, sdrt and the
engine dir installed at the same path on every node), `--ray-address auto` joins it.
"""

from __future__ import annotations

import logging
import signal
import threading

from sdrt.errors import InputError

log = logging.getLogger("sdrt.serve")

APP_NAME = "sdrt"


def deployment(config, replicas: int = 1, autoscaling: dict | None = None, num_cpus: float = 1.0):
    """A Ray Serve deployment of the sdrt app (bind() it, then serve.run)."""
    from ray import serve

    from sdrt.serve.app import create_app

    @serve.ingress()
    class SdrtReplica:
        def __init__(self, config):
            self.config = config

        def __serve_build_asgi_app__(self):
            return create_app(self.config)

    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    return serve.deployment(SdrtReplica, name="SdrtReplica", ray_actor_options={"num_cpus": num_cpus},
                            max_ongoing_requests=config.max_queue + config.max_batch, **scale)


def start(config, host: str, port: int, replicas: int = 1, address: str | None = None,
          autoscaling: dict | None = None, num_cpus: float = 1.0):
    """Connect to (or start) Ray, start Serve's proxy on HOST:PORT and run the app; returns its handle."""
    import ray
    from ray import serve

    if replicas < 1:
        raise InputError(f"--replicas must be at least 1, got {replicas}")
    config.engines = config.engines.resolve()  # replicas may run in another working directory
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    app = deployment(config, replicas, autoscaling, num_cpus).bind(config)
    return serve.run(app, name=APP_NAME, route_prefix="/")


def serve_on_ray(config, host: str, port: int, replicas: int = 1, address: str | None = None,
                 autoscaling: dict | None = None) -> int:
    """The CLI's --ray: run until SIGINT / SIGTERM, then shut Serve down (replicas drain their requests)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise InputError("--ray needs Ray Serve: pip install 'sdrt[ray]'") from None
    start(config, host, port, replicas, address, autoscaling)
    print(f"sdrt serve: {config.engines} on Ray Serve, {replicas if not autoscaling else 'autoscaled'} "
          f"replica(s), http://{host}:{port}  (Ctrl-C or SIGTERM stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    from ray import serve

    serve.shutdown()
    print("sdrt serve: stopped", flush=True)
    return 0
