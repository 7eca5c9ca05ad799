"""Tiny seeded diffusers checkpoints (made with save_pretrained) and their exported engine dirs.

Three checkpoints cover the axes the runtime must get right:
- eps:   the built-in `tiny` (SD 1.x layout, epsilon, PNDM config with leading spacing, VAE factor 8)
- vpred: SD 2.x layout (linear projections, per-block heads, gelu CLIP, "!" padding), v_prediction,
         DDIM config with trailing spacing
- f4:    a 3-level VAE (scale factor 4), Euler config with linspace spacing (fractional timesteps)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

for name in ("onnx_ir", "onnxscript", "torch.onnx"):
    logging.getLogger(name).setLevel(logging.ERROR)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory):
    """One export cache for the session (sdrt.export.onnx_export.CACHE_ENV): the many exports of the
    same tiny checkpoint (precisions, backends, CLI runs, single files of it) run torch's exporter
    once per distinct module. Subprocesses inherit it."""
    from sdrt.export.onnx_export import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = old or str(_shared_dir(tmp_path_factory, "export-cache"))  # a developer's own, if set
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old

CHECKPOINTS = ("eps", "vpred", "f4")
# test image size per checkpoint (width, height): non-square, latents at least 6 wide; eps has an
# odd latent width (9), which diffusers' UNet handles by explicit upsample sizes
SIZES = {"eps": (72, 48), "vpred": (48, 64), "f4": (32, 24)}


def make_checkpoint(kind: str, path: Path) -> Path:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdrt.export import architectures, sources

    if kind == "eps":
        pipe = sources.build_builtin("tiny", path.parent / f"{kind}-scratch")
        pipe.save_pretrained(path)
        return path
    cfg = architectures.TINY
    tok_dir = path.parent / f"{kind}-tok"
    sources.clip_tokenizer.write_builtin_files(tok_dir)
    torch.manual_seed({"vpred": 1, "f4": 2}[kind])
    te_cfg = dict(cfg["text_encoder"])
    unet_cfg = dict(cfg["unet"])
    vae_cfg = dict(cfg["vae"])
    base = dict(architectures.SD15_SCHEDULER)
    base.pop("_class_name")
    if kind == "vpred":
        te_cfg["hidden_act"] = "gelu"
        unet_cfg.update(use_linear_projection=True, attention_head_dim=(2, 4))
        scheduler = DDIMScheduler.from_config(base | {"prediction_type": "v_prediction",
                                                      "timestep_spacing": "trailing"})
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    else:
        vae_cfg.update(block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3)
        scheduler = EulerDiscreteScheduler.from_config(base | {"timestep_spacing": "linspace"})
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                bos_token_id=49406, eos_token_id=49407, **te_cfg))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**vae_cfg), text_encoder=text_encoder,
                                   unet=UNet2DConditionModel(**unet_cfg), tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def tiny_variant(root: Path, pipeline_cls, in_channels: int, seed: int, **extra) -> tuple[Path, Path]:
    """(checkpoint dir, engine dir): the built-in tiny model with a UNet of IN_CHANNELS inputs (seeded
    SEED) as PIPELINE_CLS with EXTRA components, saved with save_pretrained and exported (standard
    graphs only: test_kernels covers the targets)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdrt.export import architectures, export, sources

    base = sources.build_builtin("tiny", root / "scratch")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(dict(architectures.TINY["unet"]) | {"in_channels": in_channels}))
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    pipeline_cls(**parts, unet=unet, **extra).save_pretrained(root / "ckpt")
    m = export(str(root / "ckpt"), root / "engines", progress=False, optimize=False)
    assert m.dims.unet_in_channels == in_channels
    return root / "ckpt", root / "engines"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {k: make_checkpoint(k, root / k) for k in CHECKPOINTS}


def _shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder all pytest-xdist workers of this run share (their temp dirs have one parent)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def engines(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """One engine dir per checkpoint, exported once for all workers (a lock per dir: the others wait
    and reuse it; tests copy an engine dir before changing it). Each worker starts with another
    checkpoint, so that torch's exporter runs for different models at once."""
    import fcntl

    from sdrt.export import export

    root = _shared_dir(tmp_path_factory, "engines")
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    kinds = list(checkpoints)
    for kind in kinds[worker % len(kinds):] + kinds[: worker % len(kinds)]:
        with open(root / f"{kind}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / kind / "manifest.json").is_file():
                export(str(checkpoints[kind]), root / kind, progress=False)
    return {kind: root / kind for kind in kinds}


def sdrt_process(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m sdrt.cli ARGS` as a child that takes Ctrl-C as a terminal would deliver it: pytest-xdist
    workers ignore SIGINT, and a child inherits that (Python then installs no KeyboardInterrupt)."""
    return subprocess.Popen([sys.executable, "-m", "sdrt.cli", *args], text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def pytest_report_header(config):
    return f"sdrt tests: {os.cpu_count()} CPUs"
