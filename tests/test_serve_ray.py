"""sdrt serve --ray: the same app on Ray Serve, two replicas of the tiny engines on a local Ray instance."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sdrt.serve import ServeConfig
from tests.conftest import SIZES
from tests.serving import call

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'sdrt[ray]')")
W, H = SIZES["eps"]
PORT = 18731


@pytest.fixture(scope="module")
def ray_url(engines):
    from ray import serve

    from sdrt.serve.ray_app import start

    start(ServeConfig(Path(engines["eps"]), max_images=2), "127.0.0.1", PORT, replicas=2)
    yield f"http://127.0.0.1:{PORT}"
    serve.shutdown()
    ray.shutdown()


def _replicas(url: str, calls: int = 30) -> set[str]:
    return {call(url, "/info")[1]["replica"] for _ in range(calls)}


def test_two_replicas_answer_and_survive_a_kill(ray_url):
    body = {"prompt": "a cat", "steps": 2, "seed": 3, "width": W, "height": H}
    replicas = _replicas(ray_url)
    assert len(replicas) == 2  # Ray's proxy spread the requests over both
    answers = [call(ray_url, "/generate", body) for _ in range(4)]
    assert all(a[0] == 200 for a in answers)
    assert len({a[1]["images"][0] for a in answers}) == 1  # same seed, same image, whichever replica ran it

    victim = int(sorted(replicas)[0].rsplit(":", 1)[1])
    os.kill(victim, signal.SIGKILL)
    time.sleep(1)
    statuses = [call(ray_url, "/generate", body)[0] for _ in range(6)]
    assert statuses == [200] * 6  # the other replica answers while Ray restarts the dead one
    deadline = time.monotonic() + 120
    while len(_replicas(ray_url, 10) - {sorted(replicas)[0]}) < 2:  # the replacement joins
        assert time.monotonic() < deadline, "Ray did not restart the killed replica"
        time.sleep(1)


def test_replicas_and_autoscaling_pass_through(engines):
    from sdrt.serve.ray_app import deployment

    config = ServeConfig(Path(engines["eps"]), max_queue=10, max_batch=6)
    assert deployment(config, replicas=3).num_replicas == 3
    scaled = deployment(config, autoscaling={"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 2})
    auto = scaled._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 5, 2)
    assert scaled._deployment_config.max_ongoing_requests == 16  # its queue plus one batch
