"""Single-file checkpoints (.safetensors / .ckpt, original LDM layout): made here from the tiny
checkpoints (tests/ldm_checkpoint.py), exported, and checked to carry exactly the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sdrt
from sdrt.cli import main
from sdrt.export import single_file, sources
from tests.conftest import SIZES


@pytest.fixture(scope="module")
def single_files(checkpoints, tmp_path_factory):
    """The `eps` checkpoint as an fp32 .safetensors and an fp16 .ckpt (weights under "state_dict")."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from tests.ldm_checkpoint import to_ldm

    d = tmp_path_factory.mktemp("single")
    ldm = to_ldm(StableDiffusionPipeline.from_pretrained(checkpoints["eps"], safety_checker=None))
    save_file(ldm, d / "eps.safetensors")
    torch.save({"state_dict": {k: v.half() for k, v in ldm.items()}, "global_step": 1}, d / "eps-fp16.ckpt")
    return d


def test_safetensors_exports_the_same_weights_and_images(checkpoints, engines, single_files, tmp_path):
    out = tmp_path / "engines"
    m = sdrt.export.export(str(single_files / "eps.safetensors"), out, config=checkpoints["eps"], progress=False,
                           optimize=False)
    want = json.loads((engines["eps"] / "manifest.json").read_text())
    assert m.source["kind"] == "single-file" and m.source["config"] == str(checkpoints["eps"].resolve())
    assert m.source["sha256"] == want["source"]["sha256"]  # every weight equal to the diffusers folder's
    assert m.scheduler_config == want["scheduler_config"] and m.prediction_type == "epsilon"
    w, h = SIZES["eps"]
    args = dict(prompt="a red cube", steps=3, seed=5, width=w, height=h)
    got = sdrt.Pipeline.load(out, optimized=False)(**args).pixels
    ref = sdrt.Pipeline.load(engines["eps"], optimized=False)(**args).pixels
    assert np.abs(got - ref).max() < 1e-6


def test_fp16_ckpt_loads_as_fp32(checkpoints, single_files, tmp_path):
    """A .ckpt (pickle) with fp16 weights: fp32 modules holding the fp16-rounded weights."""
    import torch

    loaded = sources.load_source(str(single_files / "eps-fp16.ckpt"), tmp_path, config=checkpoints["eps"])
    ref = sources.load_source(str(checkpoints["eps"]), tmp_path).pipe
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(loaded.pipe, part).state_dict(), getattr(ref, part).state_dict()
        assert got.keys() == want.keys()
        assert all(got[k].dtype == torch.float32 and got[k].equal(want[k].half().float()) for k in want)


def test_cli_prediction_type_override(checkpoints, single_files, tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["export", str(single_files / "eps.safetensors"), str(out), "--config", str(checkpoints["eps"]),
                 "--prediction-type", "v_prediction", "--no-optimize", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prediction_type"] == "v_prediction"
    assert manifest["scheduler_config"]["prediction_type"] == "v_prediction"
    from sdrt.bench.paths import EagerPath
    from sdrt.manifest import Manifest

    eager = EagerPath(Manifest.read(out), out)  # the bench's eager side: same file, configs and override
    assert eager.scheduler_config["prediction_type"] == "v_prediction"


def _keys_only(path, shapes: dict):
    """A safetensors file holding zero tensors under the keys diffusers detects architectures by."""
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, path)
    return path


@pytest.mark.parametrize("case", ["detected-mismatch", "sd2-detected", "sdxl", "inpainting", "corrupt",
                                  "truncated", "oversized-header", "not-safetensors", "config-not-diffusers",
                                  "config-for-folder"])
def test_single_file_bad_input(checkpoints, single_files, tmp_path, capsys, case):
    """Exit 2, one line naming the problem, nothing written."""
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    whole = (single_files / "eps.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole[: len(whole) // 2])
    oversized = tmp_path / "oversized.safetensors"
    oversized.write_bytes((1 << 40).to_bytes(8, "little") + whole[8:100])
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"PK\x03\x04" + bytes(200))  # a zip (a .ckpt) renamed
    unet = "model.diffusion_model.input_blocks."
    sd2 = {unet + "2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    args, message = {
        "sd2-detected": ([_keys_only(tmp_path / "sd2.safetensors", sd2)], r"does not load as SD 2\.x \(detected\)"),
        "sdxl": ([_keys_only(tmp_path / "xl.safetensors", {
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)})],
            r"a 'xl_base' checkpoint .*; sdrt exports SD 1\.x and SD 2\.x txt2img, inpainting and depth models"),
        "inpainting": ([_keys_only(tmp_path / "inpaint.safetensors", sd2 | {unet + "0.0.weight": (320, 9, 3, 3)})],
                       r"does not load as SD 2\.x inpainting \(detected\)"),
        # the tiny file has SD 1.x's layout but not its sizes: the detected configs don't fit
        "detected-mismatch": ([single_files / "eps.safetensors"],
                              r"does not load as SD 1\.x \(detected\): .*expected shape.*pass --config DIR"),
        "corrupt": ([corrupt], r"corrupt\.safetensors: not a \.safetensors file \(its header is not JSON\)"),
        "truncated": ([truncated, "--config", checkpoints["eps"]],
                      r"truncated\.safetensors: truncated: its tensors end at byte [\d,]+, the file has [\d,]+"),
        "oversized-header": ([oversized], r"oversized\.safetensors: not a \.safetensors file \(its first 8 bytes "
                                          r"give a header of 1,099,511,627,776 bytes"),
        "not-safetensors": ([foreign], r"foreign\.safetensors: not a \.safetensors file"),
        "config-not-diffusers": ([single_files / "eps.safetensors", "--config", tmp_path],
                                 r"--config .*: expected a diffusers folder"),
        "config-for-folder": ([checkpoints["eps"], "--config", checkpoints["eps"]],
                              r"--config is for single-file checkpoints"),
    }[case]
    assert main(["export", *map(str, args), str(out), "--no-optimize", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    import re

    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_builtin_configs_are_sd15_and_sd21(tmp_path):
    """The configs written for detected SD 1.x / 2.x files build SD 1.5's and SD 2.1's modules:
    their parameter counts (on the meta device, no weights) and tokenizer padding."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    counts = {"v1": (859_520_964, 83_653_863, 123_060_480), "v2": (865_910_724, 83_653_863, 340_387_840),
              # inpainting: conv_in takes 9 channels, 5 more of 320 3x3 kernels (+14,400)
              "inpainting": (859_535_364, 83_653_863, 123_060_480),
              "inpainting_v2": (865_925_124, 83_653_863, 340_387_840)}
    sd2 = {"v2", "inpainting_v2"}
    for model_type, (unet_n, vae_n, text_n) in counts.items():
        d = tmp_path / model_type
        single_file.write_configs(model_type, d)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder"))
        assert [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)] == [unet_n, vae_n, text_n]
        tok = CLIPTokenizer.from_pretrained(d / "tokenizer")
        assert tok.pad_token == ("!" if model_type in sd2 else "<|endoftext|>")
        index = json.loads((d / "model_index.json").read_text())
        assert index["_class_name"] == ("StableDiffusionInpaintPipeline" if "inpainting" in model_type
                                        else "StableDiffusionPipeline")
        scheduler = DDIMScheduler if model_type in sd2 else PNDMScheduler
        assert index["scheduler"] == ["diffusers", scheduler.__name__]
        config = scheduler.load_config(d / "scheduler")
        assert config["prediction_type"] == ("v_prediction" if model_type == "v2" else "epsilon")
        assert config["steps_offset"] == 1 and config["beta_schedule"] == "scaled_linear"


def test_sd2_layout_with_open_clip_text_encoder(checkpoints, engines, tmp_path):
    """The `vpred` checkpoint (SD 2.x layout) as an SD 2.x file stores it: OpenCLIP's text tower
    (fused q/k/v). With its folder as --config: the same weights and the v-prediction scheduler."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from tests.ldm_checkpoint import to_ldm

    ldm = to_ldm(StableDiffusionPipeline.from_pretrained(checkpoints["vpred"], safety_checker=None), open_clip=True)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in ldm
    save_file(ldm, tmp_path / "vpred.safetensors")
    loaded = sources.load_source(str(tmp_path / "vpred.safetensors"), tmp_path, config=checkpoints["vpred"])
    want = json.loads((engines["vpred"] / "manifest.json").read_text())
    assert sources.content_hash(loaded.pipe) == want["source"]["sha256"]
    assert loaded.scheduler_config == want["scheduler_config"]
    assert loaded.pipe.tokenizer.pad_token == "!"
