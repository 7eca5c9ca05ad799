"""`sdrt export --lora`: LoRAs fused at export give diffusers' images with the same LoRAs loaded
(unfused, at the same scales), in diffusers' format and in kohya / A1111's."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import sdrt
from sdrt.cli import main
from sdrt.export.lora import Lora
from sdrt.runtime import noise
from tests import reference
from tests.conftest import SIZES

UNET_LAYERS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]
TEXT_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def make_lora(checkpoint: Path, path: Path, *, seed: int, kohya: bool, rank: int = 4, alpha: float = 8.0) -> Path:
    """A random LoRA for CHECKPOINT's UNet and text encoder. diffusers' format stores no alpha (it
    loads as alpha = rank); kohya's stores ALPHA per layer, so its layers count alpha / rank times."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    torch.manual_seed(seed)
    for part, layers in ((pipe.unet, UNET_LAYERS), (pipe.text_encoder, TEXT_LAYERS)):
        part.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=layers))
    unet, text = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    if not kohya:
        StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=unet, text_encoder_lora_layers=text)
        return path / "pytorch_lora_weights.safetensors"
    out = {}
    for prefix, state in (("lora_unet_", unet), ("lora_te_text_model_", text)):
        for key, t in state.items():
            layer, kind = key.rsplit(".lora_", 1)
            name = prefix + layer.replace(".", "_")
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = t.contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(out, path)
    return path


@pytest.fixture(scope="module")
def loras(checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return (make_lora(checkpoints["eps"], d / "diffusers", seed=1, kohya=False),
            make_lora(checkpoints["eps"], d / "kohya.safetensors", seed=2, kohya=True))


def _diffusers_with_loras(checkpoint, files, scales, latents, fuse: bool = False, **args):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f), adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(files))], adapter_weights=scales)
    if fuse:  # diffusers with the LoRAs fused at their scales, as sdrt merges them
        pipe.fuse_lora(adapter_names=[f"l{i}" for i in range(len(files))])
    pipe.scheduler = reference.scheduler_for(dict(pipe.scheduler.config), "ddim")
    return pipe(args["prompt"], num_inference_steps=args["steps"], guidance_scale=args["guidance_scale"],
                width=args["width"], height=args["height"], latents=torch.from_numpy(latents.astype(np.float32)),
                output_type="np").images


def test_fused_loras_match_diffusers(checkpoints, engines, loras, tmp_path, capsys):
    out = tmp_path / "engines"
    specs = [f"{loras[0]}:0.8", f"{loras[1]}:-0.5"]
    assert main(["export", str(checkpoints["eps"]), str(out), "--no-optimize", "-q",
                 *[x for s in specs for x in ("--lora", s)]]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = manifest["source"]["loras"]
    assert [(r["file"], r["scale"]) for r in recorded] == [(str(f.resolve()), s) for f, s in zip(loras, (0.8, -0.5))]
    assert all(len(r["sha256"]) == 64 for r in recorded)
    base = json.loads((engines["eps"] / "manifest.json").read_text())
    assert manifest["source"]["sha256"] != base["source"]["sha256"]  # the fused weights' hash
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"LoRA fused     {loras[1].resolve()} at -0.5" in capsys.readouterr().out
    from sdrt.bench.paths import EagerPath
    from sdrt.manifest import Manifest

    EagerPath(Manifest.read(out), out)  # the bench's eager side re-applies the LoRAs: same weights hash

    w, h = SIZES["eps"]
    args = dict(prompt="a photo of an astronaut", steps=4, guidance_scale=7.5, width=w, height=h)
    latents = noise.randn([3], noise.INITIAL, (1, 4, h // 8, w // 8))
    ours = sdrt.Pipeline.load(out, optimized=False)(**args, sampler="ddim", latents=latents).pixels
    want = _diffusers_with_loras(checkpoints["eps"], loras, [0.8, -0.5], latents, **args)
    without = sdrt.Pipeline.load(engines["eps"], optimized=False)(**args, sampler="ddim", latents=latents).pixels
    assert np.abs(ours - want).max() < 2e-3
    assert np.abs(ours - without).max() > 0.05  # the LoRAs change the image: the check above means something


@pytest.mark.parametrize("text,path,scale", [
    ("a.safetensors", "a.safetensors", 1.0), ("a.safetensors:0.5", "a.safetensors", 0.5),
    ("dir/a.safetensors:-1", "dir/a.safetensors", -1.0),
    ("C:\\loras\\a.safetensors", "C:\\loras\\a.safetensors", 1.0),
    ("C:\\loras\\a.safetensors:.7", "C:\\loras\\a.safetensors", 0.7),
    ("odd:name.safetensors", "odd:name.safetensors", 1.0),
])
def test_lora_argument(text, path, scale):
    assert Lora.parse(text) == Lora(Path(path), scale)


@pytest.mark.parametrize("case", ["missing", "foreign", "not-safetensors"])
def test_lora_bad_input(checkpoints, tmp_path, capsys, case):
    """Exit 2, one line naming the file and the problem, nothing written."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "out"
    if case == "foreign":  # kohya keys for layers this model doesn't have (an SDXL LoRA, say)
        key = "lora_unet_input_blocks_4_1_proj_in"
        save_file({f"{key}.lora_down.weight": torch.zeros(4, 640), f"{key}.lora_up.weight": torch.zeros(640, 4)},
                  tmp_path / "x.safetensors")
    elif case == "not-safetensors":
        (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    message = {"missing": r"--lora .*x\.safetensors: no such file",
               "foreign": r"--lora .*x\.safetensors: .*(none of its weights matches|not a LoRA for this model)",
               "not-safetensors": r"--lora .*x\.safetensors: not a LoRA for this model"}[case]
    assert main(["export", str(checkpoints["eps"]), str(out), "--lora", str(tmp_path / "x.safetensors"),
                 "--no-optimize", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


# -- LoRAs per request (no re-export) -------------------------------------------------------------------

ARGS = dict(prompt="a photo of an astronaut", steps=3, guidance_scale=7.5, sampler="ddim")


def _latents():
    w, h = SIZES["eps"]
    return noise.randn([3], noise.INITIAL, (1, 4, h // 8, w // 8))


@pytest.fixture(scope="module")
def lora_dir(loras, tmp_path_factory):
    """A1111's Lora folder: the diffusers-format LoRA as `detail`, the kohya one as `style/style` (a subfolder)."""
    import shutil

    d = tmp_path_factory.mktemp("Lora")
    shutil.copy(loras[0], d / "detail.safetensors")
    (d / "style").mkdir()
    shutil.copy(loras[1], d / "style" / "style.safetensors")
    return d


@pytest.fixture(scope="module")
def lora_pipe(engines, lora_dir):
    with sdrt.Pipeline.load(engines["eps"]) as p:
        p.set_lora_dir(lora_dir)
        yield p


def test_weight_map_holds_every_layers_weight(checkpoints, engines):
    """Each mapped initializer's bytes in the weights file are the layer's PyTorch weight (transposed where
    the graph's MatMul takes it so); every Linear and Conv2d layer is in the map."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdrt.runtime.lora import canonical

    ref = StableDiffusionPipeline.from_pretrained(checkpoints["eps"], safety_checker=None)
    manifest = json.loads((engines["eps"] / "manifest.json").read_text())
    for component, adapted in (("unet", UNET_LAYERS), ("text_encoder", TEXT_LAYERS)):
        layers = json.loads((engines["eps"] / manifest["components"][component]["weight_map"]).read_text())["layers"]
        modules = dict(getattr(ref, component).named_modules())
        wanted = [p for p in modules if p.rsplit(".", 1)[-1] in {a.rsplit(".", 1)[-1] for a in adapted}
                  and any(p.endswith(a) for a in adapted)]
        assert wanted and all(canonical(component, p) in layers for p in wanted)
        assert len(layers) == sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in modules.values())
        by_name = {canonical(component, p): m for p, m in modules.items()}
        for name, e in layers.items():
            got = np.memmap(engines["eps"] / e["file"], dtype=e["dtype"], mode="r", offset=e["offset"],
                            shape=tuple(e["shape"]))
            w = by_name[name].weight.detach().numpy()
            assert np.array_equal(got, w.T if e["transposed"] else w), name


def test_per_request_loras_match_diffusers(checkpoints, lora_pipe, loras):
    """loras=[(A, 0.8)] is diffusers with A loaded and fused at 0.8; two LoRAs (diffusers' format and
    kohya's, with its alpha) add up as diffusers adds them. On the optimized CPU graphs."""
    lat = _latents()
    w, h = SIZES["eps"]
    size = dict(width=w, height=h)
    ours = lora_pipe(**ARGS, **size, latents=lat, loras=[(str(loras[0]), 0.8)]).pixels
    want = _diffusers_with_loras(checkpoints["eps"], loras[:1], [0.8], lat, **ARGS, **size, fuse=True)
    assert np.abs(ours - want).max() < 2e-3
    both = lora_pipe(**ARGS, **size, latents=lat, loras=[(str(loras[0]), 0.8), (str(loras[1]), -0.5)]).pixels
    want = _diffusers_with_loras(checkpoints["eps"], loras, [0.8, -0.5], lat, **ARGS, **size, fuse=True)
    assert np.abs(both - want).max() < 2e-3
    base = lora_pipe(**ARGS, **size, latents=lat).pixels
    assert np.abs(ours - base).max() > 0.05 and np.abs(both - ours).max() > 0.05  # the checks mean something


def test_switching_sets_is_bit_identical(lora_pipe, loras):
    """base -> A -> B -> A -> base: each set's image is bit for bit what it was the first time."""
    w, h = SIZES["eps"]
    run = [(), [(str(loras[0]), 0.8)], [(str(loras[1]), 1.0)], [(str(loras[0]), 0.8)], ()]
    images = [lora_pipe(**ARGS, width=w, height=h, seed=3, loras=list(s) or None).pixels for s in run]
    assert np.array_equal(images[1], images[3]) and np.array_equal(images[0], images[4])
    assert not np.array_equal(images[1], images[2]) and not np.array_equal(images[0], images[1])


def test_prompt_tags_name_files_in_the_lora_dir(lora_pipe, loras):
    """`<lora:NAME:W>` is `loras=[(FILE, W)]` (the tag leaves the prompt); `<lora:NAME:TE:UNET>` weighs
    the text encoder and the UNet apart; the PNG records `Lora hashes` as A1111 does."""
    import hashlib

    w, h = SIZES["eps"]
    size = dict(width=w, height=h, seed=5)
    tagged = lora_pipe(**(ARGS | {"prompt": ARGS["prompt"] + " <lora:detail:0.8>"}), **size)
    direct = lora_pipe(**ARGS, **size, loras=[(str(loras[0]), 0.8)])
    assert np.array_equal(tagged.pixels, direct.pixels)
    digest = hashlib.sha256(loras[0].read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "detail: {digest}"' in tagged.parameters[0]
    assert tagged.parameters[0].startswith(ARGS["prompt"] + " <lora:detail:0.8>\n")
    # the request's own LoRAs are written as tags, so that the PNG reproduces the image
    assert direct.parameters[0].startswith(ARGS["prompt"] + " <lora:pytorch_lora_weights:0.8>\n")
    split = lora_pipe(**(ARGS | {"prompt": "<lora:style:0:1>" + ARGS["prompt"]}), **size)
    unet_only = lora_pipe(**ARGS, **size, loras=[(str(loras[1]), 0.0, 1.0)])
    assert np.array_equal(split.pixels, unet_only.pixels)
    assert not np.array_equal(split.pixels, lora_pipe(**ARGS, **size, loras=[(str(loras[1]), 1.0)]).pixels)


def test_generate_cli_lora_dir_and_from_png(engines, lora_dir, tmp_path):
    """`sdrt generate --lora-dir` reads the tags; `--from-png` of its PNG makes the same image."""
    from PIL import Image

    w, h = SIZES["eps"]
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--engines", str(engines["eps"]), "--lora-dir", str(lora_dir), "-q"]
    assert main(["generate", "a castle <lora:style:0.7>", *common, "-o", str(first), "--steps", "2", "--seed", "9",
                 "--width", str(w), "--height", str(h)]) == 0
    assert main(["generate", *common, "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    plain = tmp_path / "c.png"
    assert main(["generate", "a castle", *common, "-o", str(plain), "--steps", "2", "--seed", "9", "--width", str(w),
                 "--height", str(h), "--lora", f"{lora_dir / 'style' / 'style.safetensors'}:0.7"]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(plain)))


def _foreign(path: Path) -> Path:
    from safetensors.numpy import save_file

    key = "lora_unet_input_blocks_4_1_proj_in"  # an SDXL / LDM-named layer: no layer of this model
    save_file({f"{key}.lora_down.weight": np.zeros((4, 640), np.float32),
               f"{key}.lora_up.weight": np.zeros((640, 4), np.float32)}, str(path))
    return path


def _loha(path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.hada_w1_a": np.zeros((4, 4), np.float32)}, str(path))
    return path


@pytest.mark.parametrize("case,message", [
    ("foreign", r"LoRA .*x\.safetensors: none of its 1 layers matches a layer of this model"),
    ("loha", r"LoRA .*x\.safetensors: a LoHa network .*LoRA and LoCon only"),
    ("missing-name", r"<lora:nope>: no nope\{\.safetensors"),
    ("no-dir", r"<lora:detail> needs a LoRA folder \(--lora-dir DIR"),
    ("hypernet", r"<hypernet:\.\.\.> is not an extra network sdrt runs"),
    ("not-a-file", r"loras: .*nothing\.safetensors: no such file"),
    ("bad-pair", r"loras: expected \(file, weight\) pairs"),
    ("bad-weight", r"<lora:detail:x>: the weights must be finite numbers"),
    ("nan-weight", r"<lora:detail:nan>: the weights must be finite numbers"),
    ("escape", r"<lora:\.\./x>: a name in the LoRA folder, not a path out of it"),
])
def test_bad_loras_are_refused_by_name(engines, lora_dir, tmp_path, case, message):
    from sdrt.errors import InputError

    prompts = {"missing-name": "a <lora:nope:1>", "no-dir": "a <lora:detail>", "hypernet": "a <hypernet:x:1>",
               "bad-weight": "a <lora:detail:x>", "nan-weight": "a <lora:detail:nan>", "escape": "a <lora:../x>"}
    files = {"foreign": _foreign, "loha": _loha}
    loras = {"not-a-file": [(str(tmp_path / "nothing.safetensors"), 1.0)], "bad-pair": [("a", "b", "c", "d")]}
    if case in files:
        loras[case] = [(str(files[case](tmp_path / "x.safetensors")), 1.0)]
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        if case != "no-dir":
            pipe.set_lora_dir(lora_dir)
        w, h = SIZES["eps"]
        with pytest.raises(InputError, match=message):
            pipe(prompts.get(case, "a castle"), loras=loras.get(case), steps=1, width=w, height=h)


def test_engines_without_weight_map_say_so(engines, loras, tmp_path):
    """An engine dir exported before weight maps (or int8) runs base images, and refuses a LoRA with the fix."""
    import shutil

    from sdrt.errors import InputError

    old = tmp_path / "old"
    shutil.copytree(engines["eps"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    for c in manifest["components"].values():
        c.pop("weight_map", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    w, h = SIZES["eps"]
    with sdrt.Pipeline.load(old) as pipe:
        pipe("a castle", steps=1, width=w, height=h)
        with pytest.raises(InputError, match=r"no weight map for its (unet|text_encoder) \(it was exported before"):
            pipe("a castle", steps=1, width=w, height=h, loras=[(str(loras[0]), 1.0)])


def test_recent_lora_files_are_read_once(lora_pipe, loras, monkeypatch):
    """Switching among recent sets reads no file again (the pipeline keeps the parsed files)."""
    from sdrt.runtime import lora

    w, h = SIZES["eps"]
    lora_pipe(**ARGS, width=w, height=h, loras=[(str(loras[0]), 0.5)])
    reads = []
    real = lora.read
    monkeypatch.setattr(lora, "read", lambda p: reads.append(p) or real(p))
    for weight in (0.25, 0.5):
        lora_pipe(**(ARGS | {"steps": 1}), width=w, height=h, loras=[(str(loras[0]), weight)])
    assert reads == []


def test_server_loras_by_name_tag_and_batching(engines, lora_dir, lora_pipe):
    """`sdrt serve --lora-dir`: `loras` names and prompt tags give the Python API's images (native API,
    webuiapi); a path or a server without a LoRA folder is a 400 naming it; waiting requests are batched
    only with the same LoRA set."""
    import base64
    import io
    import threading

    import webuiapi
    from PIL import Image

    from sdrt.serve import ServeConfig
    from tests.serving import Gate, LiveServer, call

    w, h = SIZES["eps"]
    args = dict(prompt="a castle", steps=2, seed=4, width=w, height=h)
    server = LiveServer(ServeConfig(engines["eps"], max_images=1, max_queue=4, max_batch=4, lora_dir=lora_dir))
    try:
        status, out, _ = call(server.url, "/generate", args | {"loras": [["detail", 0.8]]})
        assert status == 200, out
        want = lora_pipe(**args, loras=[("detail", 0.8)])
        got = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.images[0]))
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=2)
        assert [x["name"] for x in api.get_loras()] == ["detail", "style"]
        a1111 = api.txt2img(prompt="a castle <lora:style:0.6>", seed=4, width=w, height=h, cfg_scale=7.5)
        want = lora_pipe("a castle <lora:style:0.6>", seed=4, width=w, height=h, steps=2, sampler="euler",
                         noise="a1111-gpu")
        assert np.array_equal(np.asarray(a1111.images[0].convert("RGB")), np.asarray(want.images[0]))
        assert "Lora hashes" in a1111.info["infotexts"][0]
        for bad, words in (([["../detail", 1]], "not a path"), ([["/etc/passwd", 1]], "not a path"),
                           ([["nope", 1]], "no nope")):
            status, out, _ = call(server.url, "/generate", args | {"loras": bad})
            assert status == 400 and words in out["error"], out

        gate = Gate(server.service.pipe)
        server.service.scheduler.pipe = gate
        first = threading.Thread(target=call, args=(server.url, "/generate", args), daemon=True)
        first.start()
        gate.running.wait(60)
        waiting = [threading.Thread(target=call, args=(server.url, "/generate", args | extra), daemon=True)
                   for extra in ({"loras": [["detail", 0.5]]}, {}, {"prompt": "a tree <lora:detail:0.5>"})]
        for t in waiting:
            t.start()
            time.sleep(0.3)  # in this order
        deadline = time.monotonic() + 60
        while server.service.scheduler.depth() < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        gate.release.set()
        for t in (first, *waiting):
            t.join(120)
        assert gate.calls == [1, 2, 1]  # the two detail-0.5 requests as one batch, the base one alone
    finally:
        server.stop()
    bare = LiveServer(ServeConfig(engines["eps"], max_images=1, max_queue=2, warmup=False))
    try:
        status, out, _ = call(bare.url, "/generate", args | {"loras": [["detail", 1]]})
        assert status == 400 and "this server has no LoRA folder" in out["error"]
    finally:
        bare.stop()


def test_locon_convolutions_match_diffusers(checkpoints, lora_pipe, tmp_path):
    """kohya's LoCon: a k x k down and a 1 x 1 up on the UNet's convolutions (3x3 ones the CPU graph runs
    as Winograd, whose transform ONNX Runtime folds from the new weights), beside a Linear layer."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    ref = StableDiffusionPipeline.from_pretrained(checkpoints["eps"], safety_checker=None)
    torch.manual_seed(5)
    tensors = {}
    for path in ("down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv2",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"):
        w = dict(ref.unet.named_modules())[path].weight
        stem = "lora_unet_" + path.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, *w.shape[1:]) * 0.3
        tensors[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], 2, *[1] * (w.dim() - 2)) * 0.3
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    save_file(tensors, tmp_path / "locon.safetensors")
    lat = _latents()
    w, h = SIZES["eps"]
    ours = lora_pipe(**ARGS, width=w, height=h, latents=lat, loras=[(str(tmp_path / "locon.safetensors"), 0.7)])
    want = _diffusers_with_loras(checkpoints["eps"], [tmp_path / "locon.safetensors"], [0.7], lat, **ARGS, width=w,
                                 height=h, fuse=True)
    base = lora_pipe(**ARGS, width=w, height=h, latents=lat).pixels
    assert np.abs(ours.pixels - want).max() < 2e-3 and np.abs(ours.pixels - base).max() > 0.02


def test_continuous_batching_admits_only_the_running_lora_set():
    """Continuous mode runs generations side by side on one pipeline's sessions: a request with another
    LoRA set waits until the running ones are done; one with the same set joins them."""
    import threading

    from sdrt.serve.scheduler import Scheduler

    class Fake:
        unet_gate = None

        def __init__(self):
            self.running, self.seen, self.release = set(), [], threading.Event()

        def batch_key(self, req):
            return None

        def lora_key(self, req):
            return req["loras"]

        def __call__(self, req, callback=None):
            self.running.add(req["name"])
            self.seen.append(sorted(self.running))
            self.release.wait(30)
            self.running.discard(req["name"])
            return req["name"]

    class Req(dict):
        num_images = 1

    pipe = Fake()
    sched = Scheduler(pipe, max_queue=8, max_batch=4, continuous=True)
    try:
        jobs = [sched.submit(Req(name=n, loras=k)) for n, k in (("a1", ("A",)), ("a2", ("A",)), ("b", ("B",)))]
        deadline = time.monotonic() + 30
        while len(pipe.seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert pipe.seen == [["a1"], ["a1", "a2"]]  # a2 joined a1 (same set); b waits (another set)
        pipe.release.set()
        assert [j.future.result(30) for j in jobs] == ["a1", "a2", "b"]
        assert pipe.seen[2] == ["b"]  # b ran alone, once the others were done
    finally:
        sched.close()


def test_lora_switch_benchmark_runs(engines, tmp_path):
    """benchmarks/lora_switch.py on the tiny engines: its four switches, and bit-identical sets."""
    import subprocess
    import sys

    w, _ = SIZES["eps"]
    subprocess.run([sys.executable, "benchmarks/lora_switch.py", "--engines", str(engines["eps"]), "--steps", "1",
                    "--size", str(w), "--small-size", str(w), "--rank", "2", "--out", str(tmp_path)], check=True,
                   capture_output=True, cwd=Path(__file__).parents[1])
    r = json.loads((tmp_path / "results.json").read_text())
    assert [s["to"] for s in r["switches"]] == ["A", "B", "A", "base"]
    assert r["a_then_a_bit_identical"] and r["base_then_base_bit_identical"]
    assert r["switches"][0]["changed_weights_mb"] > 0 and r["switches"][3]["changed_weights_mb"] == 0
    assert "| switch to | seconds |" in (tmp_path / "results.md").read_text()


def test_a_lora_file_rewritten_in_place_is_read_again(lora_pipe, loras, tmp_path):
    """The same path with new contents (a retrained LoRA saved over the old one) gives the new weights."""
    import os
    import shutil

    w, h = SIZES["eps"]
    path = tmp_path / "style.safetensors"
    shutil.copy(loras[1], path)
    first = lora_pipe(**ARGS, width=w, height=h, seed=3, loras=[(str(path), 1.0)]).pixels
    shutil.copy(loras[0], path)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a newer time even on coarse clocks
    second = lora_pipe(**ARGS, width=w, height=h, seed=3, loras=[(str(path), 1.0)]).pixels
    want = lora_pipe(**ARGS, width=w, height=h, seed=3, loras=[(str(loras[0]), 1.0)]).pixels
    assert not np.array_equal(first, second) and np.array_equal(second, want)


def test_loras_need_onnx_runtime_sessions(engines, loras):
    """OpenVINO and TensorRT engines take no replaced weights: refused with the fix, before a session closes."""
    from sdrt.errors import InputError
    from sdrt.runtime.backends import check_weights

    for backend, provider, words in (("tensorrt", "tensorrt", "not on TensorRT engines"),
                                     ("onnx", "openvino", "not on openvino")):
        with pytest.raises(InputError, match=words + r": fuse them at export instead"):
            check_weights(backend, provider)
    check_weights("onnx", "cpu")
    pytest.importorskip("openvino")
    w, h = SIZES["eps"]
    with sdrt.Pipeline.load(engines["eps"], provider="openvino") as pipe:
        pipe("a castle", steps=1, width=w, height=h)
        loaded = dict(pipe.engines)
        with pytest.raises(InputError, match="not on openvino"):
            pipe("a castle", steps=1, width=w, height=h, loras=[(str(loras[0]), 1.0)])
        assert pipe.engines == loaded  # nothing was closed


def test_a_switch_loads_only_the_unet_graphs_the_generation_runs(lora_pipe, loras):
    """A generation that switches sets loads the UNet graphs it runs (feature caching's pair, not the
    plain graph); use_loras ahead of time (a server) loads the plain graph at once."""
    from sdrt.runtime.feature_cache import FULL, SHALLOW

    w, h = SIZES["eps"]
    args = dict(ARGS, width=w, height=h, seed=3, cache_interval=2)
    lora_pipe.unload("unet")
    a = lora_pipe(**args, loras=[(str(loras[0]), 0.8)]).pixels
    assert "unet" not in lora_pipe.engines and {FULL, SHALLOW} <= set(lora_pipe.engines)
    base = lora_pipe(**args).pixels
    assert "unet" not in lora_pipe.engines
    assert np.array_equal(lora_pipe(**args, loras=[(str(loras[0]), 0.8)]).pixels, a)  # the pair got A again
    assert np.abs(a - base).max() > 0.05
    lora_pipe.use_loras(None)
    assert "unet" in lora_pipe.engines
