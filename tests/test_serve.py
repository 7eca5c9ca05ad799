"""sdrt serve: the HTTP/JSON API on the tiny engines, over a real socket."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.serve import Server, make_http_server
from tests.conftest import SIZES

W, H = SIZES["eps"]


@pytest.fixture(scope="module")
def url(engines):
    server = Server(engines["eps"], max_images=2)
    httpd = make_http_server(server, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    server.close()


def call(url, path, body=None, method=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_generate_returns_the_pipelines_images(url, engines):
    args = dict(prompt="a red cube", steps=3, seed=4, width=W, height=H, num_images=2, sampler="euler")
    status, out = call(url, "/generate", args)
    assert status == 200 and out["seeds"] == [4, 5] and len(out["images"]) == 2
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        want = pipe(**args)
    for b64, image, text in zip(out["images"], want.images, want.parameters):
        got = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert np.array_equal(np.asarray(got), np.asarray(image))
        assert got.text["parameters"] == text  # A1111 metadata in the PNG
    assert out["parameters"] == want.parameters and out["seconds"] > 0


def test_img2img_and_inpainting_take_base64_images(url):
    yy, xx = np.mgrid[0:H, 0:W]
    image = Image.fromarray(np.stack([xx * 3, yy * 5, xx + yy], -1).astype(np.uint8))
    mask = Image.fromarray(((xx > W // 2) * 255).astype(np.uint8))
    status, out = call(url, "/generate", {"prompt": "a dog", "steps": 2, "image": _png(image), "strength": 0.5})
    assert status == 200 and Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).size == (W, H)
    status, out = call(url, "/generate", {"prompt": "a dog", "steps": 2, "image": _png(image), "mask": _png(mask)})
    assert status == 200 and len(out["images"]) == 1


def test_health_and_info(url):
    assert call(url, "/health") == (200, {"status": "ok"})
    status, info = call(url, "/info")
    assert status == 200 and info["pipeline"] == "txt2img" and "euler" in info["samplers"]
    assert info["max_images"] == 2 and "prompt" in info["fields"]


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "body is not JSON"),
    (b"[1, 2]", 400, "body must be a JSON object"),
    ({"steps": 2}, 400, "prompt is required"),
    ({"prompt": "x", "size": 512}, 400, "unknown field(s) size; accepted: prompt"),
    ({"prompt": "x", "steps": "many"}, 400, "steps: expected an integer, got 'many'"),
    ({"prompt": "x", "guidance_scale": True}, 400, "guidance_scale: expected a number, got True"),
    ({"prompt": "x", "num_images": 3}, 400, "num_images: at most 2 per request"),
    ({"prompt": "x", "width": 7, "steps": 1}, 400, "width 7: must be a multiple of 8"),
    ({"prompt": "x", "sampler": "fast"}, 400, "unknown sampler 'fast'"),
    ({"prompt": "x", "image": "%%%"}, 400, "image: not base64"),
    ({"prompt": "x", "image": base64.b64encode(b"not an image").decode()}, 400, "image: not an image Pillow can read"),
    ({"prompt": "x", "mask": ""}, 400, "mask: not an image"),
])
def test_bad_requests_get_a_400_naming_the_problem(url, body, status, message):
    raw = body if isinstance(body, bytes) else None
    got_status, out = call(url, "/generate", None if raw else body, raw=raw)
    assert got_status == status and message in out["error"], out
    assert "\n" not in out["error"]
    assert call(url, "/health")[0] == 200  # still serving


def test_wrong_paths_and_methods(url):
    assert call(url, "/nope")[0] == 404
    assert call(url, "/generate")[0] == 405
    assert call(url, "/health", {"prompt": "x"})[0] == 405


def test_engine_failure_is_a_500_and_the_server_goes_on(url, monkeypatch):
    from sdrt.runtime import pipeline

    def broken(self, *a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(pipeline.Pipeline, "__call__", broken)
    status, out = call(url, "/generate", {"prompt": "x"})
    assert status == 500 and out["error"] == "generation failed: RuntimeError: device lost"
    monkeypatch.undo()
    assert call(url, "/generate", {"prompt": "x", "steps": 1, "width": W, "height": H})[0] == 200


def test_cli_errors(engines, capsys):
    from sdrt.cli import main

    assert main(["serve", "--engines", str(engines["eps"]), "--max-images", "0", "-q"]) == 2
    assert "--max-images must be from 1 to 8, got 0" in capsys.readouterr().err
    assert main(["serve", "--engines", "/no/such/dir", "-q"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_sdrt_serve_command(engines, stop):
    """The console command: prints where it listens, answers, stops cleanly on Ctrl-C or SIGTERM."""
    import re
    import signal
    import subprocess

    from tests.conftest import sdrt_process

    proc = sdrt_process("serve", "--engines", str(engines["eps"]), "--port", "0", "-q", stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert found, line + proc.stderr.read()
        assert call(found.group(1), "/health") == (200, {"status": "ok"})
    finally:
        proc.send_signal(getattr(signal, stop))
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()  # only if it is still running after a failure
    assert proc.returncode == 0 and "sdrt serve: stopped" in err
