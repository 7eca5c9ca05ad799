"""`sdrt export --lora`: LoRAs fused at export give diffusers' images with the same LoRAs loaded
(unfused, at the same scales), in diffusers' format and in kohya / A1111's."""

from __future__ import annotations

import json
import re
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


def _diffusers_with_loras(checkpoint, files, scales, latents, **args):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f), adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(files))], adapter_weights=scales)
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
