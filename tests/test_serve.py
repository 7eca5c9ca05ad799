"""sdrt serve: the native, OpenAI and A1111 APIs on the tiny engines, over a real uvicorn server, with the
real `openai` and `webuiapi` clients; bad input, limits, auth, metrics, queueing, batching, cancelling."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

import sdrt
from sdrt.serve import ServeConfig
from tests.conftest import SIZES
from tests.serving import Gate, LiveServer, call, post_raw, raw_http

W, H = SIZES["eps"]


@pytest.fixture(scope="module")
def live(engines):
    server = LiveServer(ServeConfig(engines["eps"], max_images=2, max_queue=4))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pipe(engines):
    with sdrt.Pipeline.load(engines["eps"]) as p:
        yield p


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _same(got: Image.Image, want: Image.Image) -> bool:
    return np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


def _picture():
    yy, xx = np.mgrid[0:H, 0:W]
    return Image.fromarray(np.stack([xx * 3, yy * 5, xx + yy], -1).astype(np.uint8))


# -- the native API ---------------------------------------------------------------------------------
def test_generate_returns_the_pipelines_images(live, pipe):
    args = dict(prompt="a red cube", steps=3, seed=4, width=W, height=H, num_images=2, sampler="euler")
    status, out, _ = call(live.url, "/generate", args)
    assert status == 200 and out["seeds"] == [4, 5] and len(out["images"]) == 2
    want = pipe(**args)
    for b64, image, text in zip(out["images"], want.images, want.parameters):
        got = _image(b64)
        assert _same(got, image)
        assert got.text["parameters"] == text  # A1111 metadata in the PNG
    assert out["parameters"] == want.parameters and out["seconds"] > 0 and out["queued_seconds"] >= 0


def test_img2img_and_inpainting_take_base64_images(live):
    yy, xx = np.mgrid[0:H, 0:W]
    mask = Image.fromarray(((xx > W // 2) * 255).astype(np.uint8))
    status, out, _ = call(live.url, "/generate", {"prompt": "a dog", "steps": 2, "image": _png(_picture()),
                                                  "strength": 0.5})
    assert status == 200 and _image(out["images"][0]).size == (W, H)
    status, out, _ = call(live.url, "/generate", {"prompt": "a dog", "steps": 2, "image": _png(_picture()),
                                                  "mask": _png(mask)})
    assert status == 200 and len(out["images"]) == 1


def test_seed_minus_one_is_a_random_seed_named_in_the_answer(live):
    status, out, _ = call(live.url, "/generate", {"prompt": "x", "steps": 1, "seed": -1, "width": W, "height": H})
    assert status == 200 and 0 <= out["seeds"][0] < 2**31 and f"Seed: {out['seeds'][0]}," in out["parameters"][0]


def test_health_ready_info_and_openapi(live):
    assert call(live.url, "/health")[:2] == (200, {"status": "ok"})
    assert call(live.url, "/ready")[:2] == (200, {"status": "ready"})
    status, info, _ = call(live.url, "/info")
    assert status == 200 and info["pipeline"] == "txt2img" and "euler" in info["samplers"]
    assert info["max_images"] == 2 and "prompt" in info["fields"]
    # the OpenAPI docs' /generate schema is GenerateRequest's declaration
    _, spec, _ = call(live.url, "/openapi.json")
    schema = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert list(schema["properties"]) == info["fields"] and schema["required"] == ["prompt"]
    assert schema["properties"]["steps"]["maximum"] == 500 and schema["properties"]["steps"]["default"] == 20


# -- the clients users already have -------------------------------------------------------------------
def test_openai_client_generate_and_edit(live, pipe):
    import openai

    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [live.service.model_name]
    out = client.images.generate(prompt="a lighthouse", n=2, size=f"{W}x{H}", response_format="b64_json",
                                 extra_body={"steps": 3, "seed": 11, "negative_prompt": "fog"})
    want = pipe("a lighthouse", num_images=2, width=W, height=H, steps=3, seed=11, negative_prompt="fog")
    assert len(out.data) == 2 and all(_same(_image(d.b64_json), w) for d, w in zip(out.data, want.images))

    # edit with an image whose right half is transparent: that half is repainted (OpenAI's mask rule)
    rgba = np.dstack([np.asarray(_picture()), np.full((H, W), 255, np.uint8)])
    rgba[:, W // 2:, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    out = client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt="a boat",
                             extra_body={"steps": 2, "seed": 3})
    mask = Image.fromarray(((rgba[..., 3] == 0) * 255).astype(np.uint8))
    want = pipe("a boat", image=_picture(), mask=mask, steps=2, seed=3)
    assert _same(_image(out.data[0].b64_json), want.images[0])

    # no transparency: img2img at the given strength
    out = client.images.edit(image=("in.png", base64.b64decode(_png(_picture())), "image/png"), prompt="a boat",
                             extra_body={"steps": 4, "seed": 3, "strength": 0.5})
    want = pipe("a boat", image=_picture(), steps=4, seed=3, strength=0.5)
    assert _same(_image(out.data[0].b64_json), want.images[0])

    with pytest.raises(openai.BadRequestError, match="model: 'dall-e-3' is not served here"):
        client.images.generate(prompt="x", model="dall-e-3")
    with pytest.raises(openai.BadRequestError, match="response_format: 'url' is not supported"):
        client.images.generate(prompt="x", response_format="url")


def test_webuiapi_txt2img_img2img_and_png_info(live, pipe):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="DPM++ 2M", scheduler="karras", steps=3)
    out = api.txt2img(prompt="a castle", negative_prompt="rain", seed=21, width=W, height=H, cfg_scale=6,
                      batch_size=2)
    want = pipe("a castle", negative_prompt="rain", seed=21, width=W, height=H, guidance_scale=6, num_images=2,
                steps=3, sampler="dpmpp_2m", schedule_type="karras", noise="a1111-gpu")  # A1111's own noise
    assert len(out.images) == 2 and all(_same(g, w) for g, w in zip(out.images, want.images))
    cpu = api.txt2img(prompt="a castle", seed=21, width=W, height=H, override_settings={"randn_source": "CPU"})
    assert _same(cpu.images[0], pipe("a castle", seed=21, width=W, height=H, steps=3, sampler="dpmpp_2m",
                                     schedule_type="karras", guidance_scale=7.0, noise="a1111-cpu").images[0])
    weighted = "a (castle:1.3) on a hill BREAK [rain]"  # A1111's prompt syntax, its emphasis setting
    out_w = api.txt2img(prompt=weighted, seed=21, width=W, height=H, override_settings={"emphasis": "No norm"})
    assert _same(out_w.images[0], pipe(weighted, seed=21, width=W, height=H, steps=3, sampler="dpmpp_2m",
                                       schedule_type="karras", guidance_scale=7.0, noise="a1111-gpu",
                                       emphasis="No norm").images[0])
    assert out.info["all_seeds"] == [21, 22] and out.info["infotexts"] == want.parameters
    assert out.parameters["prompt"] == "a castle"  # the request, echoed as A1111 does

    mask = Image.fromarray(((np.mgrid[0:H, 0:W][1] > W // 3) * 255).astype(np.uint8))
    out = api.img2img(images=[_picture()], mask_image=mask, prompt="a castle", seed=5, width=W, height=H,
                      denoising_strength=0.6, mask_blur=4)
    want = pipe("a castle", image=_picture(), mask=mask.filter(ImageFilter.GaussianBlur(4)), seed=5, width=W,
                height=H, strength=0.6, guidance_scale=7.0, steps=3, sampler="dpmpp_2m", schedule_type="karras",
                noise="a1111-gpu")
    assert _same(out.images[0], want.images[0])

    info = api.png_info(out.images[0])
    assert info.info == want.parameters[0] and info.parameters["Seed"] == "5" and info.parameters["Size-1"] == str(W)
    assert "DPM++ 2M" in [s["name"] for s in api.get_samplers()]
    assert api.get_sd_models()[0]["model_name"] == live.service.model_name
    assert api.get_options()["sd_model_checkpoint"] == live.service.model_name
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None


# -- bad input --------------------------------------------------------------------------------------
def _huge_png(w: int, h: int) -> str:
    """A PNG header declaring W x H (the pixels never exist: a decompression bomb's first bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


BAD = [  # (path, body, status, words the answer must contain)
    ("/generate", b"{not json", 400, "body is not JSON"),
    ("/generate", b"[1, 2]", 400, "body must be a JSON object"),
    ("/generate", {"steps": 2}, 400, "prompt is required"),
    ("/generate", {"prompt": "x", "size": 512}, 400, "unknown field(s) size; accepted: prompt"),
    ("/generate", {"prompt": "x", "steps": "many"}, 400, "steps: expected an integer, got 'many'"),
    ("/generate", {"prompt": "x", "guidance_scale": True}, 400, "guidance_scale: expected a number, got True"),
    ("/generate", {"prompt": "x", "num_images": 3}, 400, "num_images: at most 2 per request"),
    ("/generate", {"prompt": "x", "width": 100000}, 400, "width 100000: must be a multiple of 8"),
    ("/generate", {"prompt": "x", "steps": 100000}, 400, "steps: 100000 is out of range (1 to 500)"),
    ("/generate", {"prompt": "x", "sampler": "fast"}, 400, "unknown sampler 'fast'"),
    ("/generate", {"prompt": "x", "image": "%%%"}, 400, "image: not base64"),
    ("/generate", {"prompt": "x", "image": base64.b64encode(b"no image").decode()}, 400, "image: not an image"),
    ("/generate", {"prompt": "x", "image": _huge_png(30000, 30000)}, 400, "image: too many pixels"),
    ("/generate", {"prompt": "x", "mask": _huge_png(5000, 5000)}, 400, "mask: 5000x5000 is 25,000,000 pixels"),
    ("/generate", b'{"prompt": "\\ud800"}', 400, "prompt: not valid Unicode"),
    ("/generate", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "body is not JSON: maximum recursion"),
    ("/generate", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, "body is not JSON: Exceeds the limit"),
    ("/generate", {"prompt": "x" * 20001}, 400, "prompt: 20001 characters is out of range"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, 400, "enable_hr: 'True' asks for an A1111 feature"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "beta"}, 400, "scheduler: 'beta' is not one sdrt has"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 0}, 400, "batch_size: expected an integer >= 1"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_vae_x": 1}}, 400, "override_settings: sdrt"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"randn_source": "quantum"}}, 400, "randn_source"),
    ("/generate", {"prompt": "x", "noise": "quantum"}, 400, "noise 'quantum': unknown source"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 400, "init_images: expected a list with one base64 image"),
    ("/sdapi/v1/png-info", {"image": "%%%"}, 400, "image: not base64"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size: expected 'WIDTHxHEIGHT'"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt is required"),
    ("/v1/images/generations", {"prompt": "x", "n": 5}, 400, "num_images: at most 2 per request"),
]


def _message(answer) -> str:
    if isinstance(answer.get("error"), dict):
        return answer["error"]["message"]  # OpenAI's shape
    return answer.get("detail") or answer["error"]  # A1111's, sdrt's


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p}-{w[:30]}" for p, _, _, w in BAD])
def test_bad_input_is_a_4xx_naming_the_problem(live, caplog, path, body, status, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = post_raw(live.port, path, raw)
    answer = json.loads(answer)
    assert got == status and words in _message(answer), answer
    assert "\n" not in _message(answer)
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text
    assert call(live.url, "/health")[0] == 200  # still serving


@pytest.mark.parametrize("request_bytes,status,words", [
    (b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (b"POST /generate HTTP/1.1\r\nHost: t\r\n\r\n", 411, "Content-Length is required"),
    (b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 300000000\r\n\r\n", 413, "body of 300000000 bytes"),
    (b"PUT /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405, "Method Not Allowed"),
    (b"PATCH /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405, "Method Not Allowed"),
    (b"DELETE /generate HTTP/1.1\r\nHost: t\r\n\r\n", 405, "Method Not Allowed"),
    (b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 404, "Not Found"),
    (b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405, "Method Not Allowed"),
])
def test_bad_http_gets_json_naming_the_problem(live, caplog, request_bytes, status, words):
    got, body = raw_http(live.port, request_bytes)
    assert got == status and words in json.loads(body)["error"]
    assert "Traceback" not in caplog.text and call(live.url, "/health")[0] == 200


def test_a_body_larger_than_declared_limits_is_cut_off(engines):
    server = LiveServer(ServeConfig(engines["eps"], max_body=1000))
    try:
        got, body = raw_http(server.port, b"POST /generate HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n")
        assert got == 413 and "over the limit of 1000 bytes" in json.loads(body)["error"]
    finally:
        server.stop()


def test_engine_failure_is_a_500_and_the_server_goes_on(live, monkeypatch):
    from sdrt.runtime import pipeline

    def broken(self, *a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(pipeline.Pipeline, "__call__", broken)
    status, out, _ = call(live.url, "/generate", {"prompt": "x", "steps": 1})
    assert status == 500 and out["error"] == "generation failed: RuntimeError: device lost"
    monkeypatch.undo()
    assert call(live.url, "/generate", {"prompt": "x", "steps": 1, "width": W, "height": H})[0] == 200


# -- operations -------------------------------------------------------------------------------------
def test_metrics_parse_with_prometheus_client(live):
    from prometheus_client.parser import text_string_to_metric_families

    call(live.url, "/generate", {"prompt": "x", "steps": 2, "width": W, "height": H})
    call(live.url, "/generate", {"prompt": "x", "steps": 0})
    with __import__("urllib.request").request.urlopen(live.url + "/metrics") as r:
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("sdrt_requests_total", (("route", "/generate"), ("status", "200")))] >= 1
    assert samples[("sdrt_requests_total", (("route", "/generate"), ("status", "400")))] >= 1
    assert samples[("sdrt_unet_steps_total", ())] >= 2 and samples[("sdrt_images_total", ())] >= 1
    assert samples[("sdrt_queue_depth", ())] == 0 and samples[("sdrt_in_flight", ())] == 0
    assert samples[("sdrt_queue_wait_seconds_count", ())] >= 1 and samples[("sdrt_unet_steps_per_second", ())] > 0
    assert ("sdrt_request_seconds_count", (("route", "/generate"),)) in samples


def test_api_key(engines):
    import openai
    import webuiapi

    server = LiveServer(ServeConfig(engines["eps"], api_key="s3cret"))
    try:
        body = {"prompt": "x", "steps": 1, "width": W, "height": H}
        status, out, headers = call(server.url, "/generate", body)
        assert status == 401 and "API key" in out["error"] and headers["www-authenticate"] == "Bearer"
        assert call(server.url, "/generate", body, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(server.url, "/metrics", headers={"Authorization": "Bearer s3cret!"})[0] == 401
        assert call(server.url, "/generate", body, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(server.url, "/health")[0] == 200 and call(server.url, "/ready")[0] == 200  # probes stay open
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
        assert openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret").models.list().data
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="me", password="s3cret")
        assert len(api.txt2img(prompt="x", steps=1, width=W, height=H).images) == 1  # HTTP Basic, as A1111's
    finally:
        server.stop()


# -- scheduling -------------------------------------------------------------------------------------
@pytest.fixture
def gated(engines):
    server = LiveServer(ServeConfig(engines["eps"], max_images=2, max_queue=2, max_batch=4))
    gate = Gate(server.service.pipe)
    server.service.scheduler.pipe = gate
    yield server, gate
    gate.release.set()
    server.stop()


def _in_thread(fn, *args, **kwargs):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("answer", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def _wait(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_queue_full_is_429_and_waiting_requests_are_batched(gated, pipe):
    server, gate = gated
    first = _in_thread(call, server.url, "/generate", {"prompt": "first", "steps": 2, "width": W, "height": H})
    gate.running.wait(60)
    shared = {"steps": 3, "width": W, "height": H, "sampler": "euler_a", "guidance_scale": 5}
    waiting = [_in_thread(call, server.url, "/generate", {"prompt": p, "seed": s, "num_images": n, **shared})
               for p, s, n in (("a cat", 7, 1), ("a dog", 100, 2))]
    _wait(lambda: server.service.scheduler.depth() == 2)
    status, out, headers = call(server.url, "/generate", {"prompt": "one too many"})
    assert status == 429 and "queue is full" in out["error"] and int(headers["retry-after"]) >= 1

    status, progress, _ = call(server.url, "/sdapi/v1/progress")
    assert progress["state"]["job_count"] == 3 and progress["state"]["sampling_steps"] == 2
    preview = _image(progress["current_image"])  # the cheap latent->RGB preview, at latent size
    assert preview.size == (W // 8, H // 8)

    gate.release.set()
    for thread, _ in (first, *waiting):
        thread.join(120)
    assert first[1]["answer"][0] == 200 and gate.calls == [1, 2]  # the two waiting requests ran as one batch
    for (_, out), (prompt, seed, n) in zip(waiting, (("a cat", 7, 1), ("a dog", 100, 2))):
        status, answer, _ = out["answer"]
        want = pipe(prompt, seed=seed, num_images=n, **shared)
        assert status == 200 and all(_same(_image(b), w) for b, w in zip(answer["images"], want.images))


def test_batched_pixels_equal_solo_within_1e_5(pipe):
    from sdrt.runtime.request import GenerateRequest

    for sampler in ("dpmpp_2m_karras", "euler_a", "ddim", "dpmpp_sde"):
        reqs = [GenerateRequest.make(prompt=p, seed=s, num_images=n, steps=4, sampler=sampler, width=W, height=H)
                for p, s, n in (("a cat", 1, 2), ("", 9, 1), ("a red dog", 3, 1))]
        together = pipe.generate_batch(reqs)
        for req, got in zip(reqs, together):
            solo = pipe(req)
            assert np.abs(got.pixels - solo.pixels).max() <= 1e-5 and got.parameters == solo.parameters


def test_interrupt_cancels_the_running_generation(gated):
    server, gate = gated
    thread, out = _in_thread(call, server.url, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": W,
                                                                     "height": H})
    gate.running.wait(60)
    assert call(server.url, "/sdapi/v1/interrupt", {})[0] == 200
    thread.join(60)
    status, answer, _ = out["answer"]
    assert status == 409 and "interrupted" in answer["detail"]
    gate.release.set()
    assert call(server.url, "/generate", {"prompt": "x", "steps": 1, "width": W, "height": H})[0] == 200


def test_a_client_that_leaves_cancels_its_work(gated):
    import socket

    server, gate = gated
    body = json.dumps({"prompt": "x", "steps": 2, "width": W, "height": H}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(body) + body)
    gate.running.wait(60)
    s.close()
    cancelled = server.service.metrics.cancelled
    _wait(lambda: cancelled.labels("disconnect")._value.get() == 1, 30)
    _wait(lambda: not server.service.scheduler.progress.jobs, 30)  # the worker is free again


def test_a_request_past_its_deadline_is_stopped(gated):
    server, gate = gated
    status, out, _ = call(server.url, "/generate", {"prompt": "x", "steps": 2, "width": W, "height": H},
                          headers={"X-Sdrt-Timeout": "0.5"})
    assert status == 503 and "deadline passed" in out["error"]
    assert call(server.url, "/generate", {"prompt": "x"}, headers={"X-Sdrt-Timeout": "soon"})[0] == 400


def test_a_waiting_request_past_its_deadline_is_answered_while_the_batch_ahead_runs(gated):
    server, gate = gated
    first = _in_thread(call, server.url, "/generate", {"prompt": "first", "steps": 2, "width": W, "height": H})
    gate.running.wait(60)
    status, out, _ = call(server.url, "/generate", {"prompt": "x", "steps": 3, "width": W, "height": H},
                          headers={"X-Sdrt-Timeout": "0.5"})
    assert status == 503 and "deadline passed" in out["error"] and first[0].is_alive()  # the first still runs
    gate.release.set()
    first[0].join(60)
    assert first[1]["answer"][0] == 200


# -- the command ------------------------------------------------------------------------------------
def test_cli_errors(engines, capsys):
    from sdrt.cli import main

    assert main(["serve", "--engines", str(engines["eps"]), "--max-images", "0", "-q"]) == 2
    assert "--max-images must be from 1 to 8, got 0" in capsys.readouterr().err
    assert main(["serve", "--engines", "/no/such/dir", "-q"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["serve", "--engines", str(engines["eps"]), "--ray", "--ray-autoscaling", "[1]", "-q"]) == 2
    assert "--ray-autoscaling: expected a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_sdrt_serve_drains_then_stops(engines, stop):
    """The console command prints where it listens; on Ctrl-C or SIGTERM it finishes the generation in
    flight (its client gets the images), then exits 0."""
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
        url = found.group(1)
        _wait(lambda: call(url, "/ready")[0] == 200)
        thread, out = _in_thread(call, url, "/generate", {"prompt": "x", "steps": 60, "width": W, "height": H})
        _wait(lambda: call(url, "/sdapi/v1/progress")[1]["state"]["sampling_step"] > 0)
        proc.send_signal(getattr(signal, stop))
        thread.join(120)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # only if it is still running after a failure
    assert out["answer"][0] == 200 and len(out["answer"][1]["images"]) == 1
    assert proc.returncode == 0 and "sdrt serve: stopped" in err and "Traceback" not in err


def test_readme_examples_work_as_pasted(live, tmp_path, monkeypatch):
    """The README's server section: its curl line and Python blocks, against this server's port."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## HTTP server"):readme.index("**Scale-out on Ray Serve.**")]
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for code in blocks:
        exec(code.replace("8000", str(live.port)), {})
    assert Image.open("lighthouse.png").size == (128, 128) and Image.open("a1111.png").size == (128, 128)
    curl = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if b.startswith("curl"))
    if shutil.which("curl"):
        subprocess.run(["bash", "-c", curl.replace("8000", str(live.port))], check=True, timeout=120)
        assert Image.open("out.png").size == (128, 128)


def test_logs_carry_at_most_200_characters_of_a_prompt(live, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="sdrt")  # CLI tests in this worker may have set sdrt's level
    prompt = "zebra " * 1000  # 14 prompt chunks: read whole, logged in part
    assert call(live.url, "/generate", {"prompt": prompt, "steps": 1, "width": W, "height": H})[0] == 200
    messages = [r.getMessage() for r in caplog.records]
    assert any("zebra" in m for m in messages)  # it was logged
    assert not any("zebra " * 35 in m for m in messages)  # 210 characters of it never were


# -- continuous batching ----------------------------------------------------------------------------
CONTINUOUS = [dict(prompt="a cat", seed=1, steps=6, sampler="dpmpp_2m_karras"),
              dict(prompt="a dog", seed=2, steps=4, sampler="euler_a", guidance_scale=3, num_images=2),
              dict(prompt="x", seed=3, steps=5, sampler="heun", guidance_scale=1),
              dict(prompt="another size", seed=4, steps=3, sampler="ddim", width=W + 8, height=H)]


def test_step_batcher_merges_different_generations_and_each_equals_its_solo_run(pipe):
    from sdrt.serve.continuous import StepBatcher

    solo = [pipe(**{"width": W, "height": H} | args) for args in CONTINUOUS]
    batcher = StepBatcher()
    pipe.unet_gate = batcher.gate
    out = {}
    try:
        threads = [threading.Thread(target=lambda i=i, a=a: out.setdefault(i, pipe(**{"width": W, "height": H} | a)))
                   for i, a in enumerate(CONTINUOUS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        pipe.unet_gate = None
    assert batcher.merged > 0  # UNet calls served several generations (different samplers, steps, guidance)
    for i, want in enumerate(solo):
        assert np.abs(out[i].pixels - want.pixels).max() <= 1e-5


def test_continuous_batching_server(engines, pipe):
    server = LiveServer(ServeConfig(engines["eps"], max_images=2, batching="continuous"))
    try:
        calls = [_in_thread(call, server.url, "/generate", {"width": W, "height": H, **a, "steps": 30})
                 for a in CONTINUOUS]
        for thread, _ in calls:
            thread.join(120)
        for (_, out), args in zip(calls, CONTINUOUS):
            status, answer, _ = out["answer"]
            want = pipe(**{"width": W, "height": H, **args, "steps": 30})
            assert status == 200 and all(_same(_image(b), w) for b, w in zip(answer["images"], want.images))
        assert server.service.scheduler.batcher.merged > 0
        assert call(server.url, "/info")[1]["batching"] == "continuous"
    finally:
        server.stop()


def test_a1111_parameters_read_back_leniently():
    from sdrt.runtime.images import a1111_parameters, parse_a1111_parameters

    text = a1111_parameters("a cat\nsecond line", "blurry", {"Steps": 20, "Sampler": "Euler a", "Size": "72x48",
                                                              "Lora hashes": "detail: 3f2a, x: 1"})
    assert 'Lora hashes: "detail: 3f2a, x: 1"' in text  # quoted as A1111 quotes a value with commas
    out = parse_a1111_parameters(text)
    assert out["Prompt"] == "a cat\nsecond line" and out["Negative prompt"] == "blurry"
    assert out["Steps"] == "20" and out["Size-1"] == "72" and out["Lora hashes"] == "detail: 3f2a, x: 1"
    odd = parse_a1111_parameters('x\nSteps: 2, Sampler: "\\q", Seed: 1')  # an invalid JSON escape: kept as is
    assert odd["Sampler"] == '"\\q"' and odd["Seed"] == "1"
    assert parse_a1111_parameters("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
