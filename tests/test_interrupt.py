"""Stopping a run: Pipeline.interrupt() from another thread stops the engine call in progress (ONNX
Runtime's terminate flag) and the generation; Ctrl-C on `sdrt generate` does the same."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

import sdrt
from sdrt.errors import Interrupted
from tests.conftest import sdrt_process


def test_interrupt_stops_an_engine_call_in_progress(engines):
    """A UNet call big enough to take a while is stopped from another thread: it raises Interrupted
    instead of returning (Backend.run checks the flag only before a call, so the call itself stopped)."""
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        unet = pipe.engine("unet")
        feeds = unet.spec.sample_inputs({"B": 8, "h": 160, "w": 160}, seed=0)
        started = threading.Event()
        unet.observers.append(lambda f: started.set())
        timer = threading.Thread(target=lambda: (started.wait(), time.sleep(0.3), pipe.interrupt()))
        timer.start()
        with pytest.raises(Interrupted):
            unet.run(feeds)
        timer.join()
        r = pipe("a cat", steps=2, width=64, height=64, seed=1)  # a new call runs again
    assert r.pixels.shape == (1, 64, 64, 3)


def test_interrupt_stops_a_generation(engines):
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        steps = []

        def callback(i, total, x, x0):
            steps.append(i)
            if i == 2:
                threading.Thread(target=pipe.interrupt).start()
                time.sleep(0.5)

        with pytest.raises(Interrupted):
            pipe("a cat", steps=50, width=64, height=64, seed=1, callback=callback)
    assert 2 <= len(steps) < 10


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_stops_generate(engines, tmp_path):
    out = tmp_path / "o.png"
    proc = sdrt_process("generate", "a cat", "--engines", str(engines["eps"]), "--steps", "500", "--width", "256",
                        "--height", "256", "-o", str(out), stderr=subprocess.PIPE)
    seen = ""
    while "generate:" not in seen:  # the progress bar: sampling has started
        seen += proc.stderr.read(1)
        assert proc.poll() is None, seen
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()  # only if it is still running after a failure
    err = seen + rest
    assert proc.returncode == 130, err
    assert "\nsdrt: interrupted" in err and "Traceback" not in err
    assert not out.exists()
