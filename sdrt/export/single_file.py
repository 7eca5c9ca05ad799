"""Single-file checkpoints: `.safetensors` / `.ckpt` in the original LDM / A1111 key layout.

diffusers converts them (`from_single_file`). What it lacks offline are the diffusers-format configs
it fetches from the hub for the architecture it detects; sdrt writes those itself for the two it
exports (SD 1.x and SD 2.x: the tables below, the same that build the built-in models), so a single
file exports with no network. `--config DIR` (a diffusers folder, or one holding only its configs)
covers any other layout; `--prediction-type` sets what the file can't say (SD 2.x 512-base files are
epsilon models, 768 ones v-prediction).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sdrt import tokenizer as clip_tokenizer
from sdrt.errors import InputError, first_line
from sdrt.export.architectures import ARCHITECTURES

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".ckpt")
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"  # the UNet's first convolution: its input channels
DEPTH_CHANNELS = 5  # a depth2img UNet: latents and depth

def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def write_configs(model_type: str, out: Path) -> None:
    """A diffusers folder without weights for ARCHITECTURES[model_type]: what from_single_file reads."""
    _, arch, scheduler, pad = ARCHITECTURES[model_type]
    parts = {"unet": ("diffusers", "UNet2DConditionModel", arch["unet"]),
             "vae": ("diffusers", "AutoencoderKL", arch["vae"]),
             "text_encoder": ("transformers", "CLIPTextModel",
                              dict(arch["text_encoder"], architectures=["CLIPTextModel"], model_type="clip_text_model",
                                   vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                   eos_token_id=49407, pad_token_id=1))}
    kind = "StableDiffusionInpaintPipeline" if arch["unet"].get("in_channels") == 9 else "StableDiffusionPipeline"
    index = {"_class_name": kind, "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", scheduler["_class_name"]], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    for name, (library, cls, config) in parts.items():
        index[name] = [library, cls]
        (out / name).mkdir(parents=True, exist_ok=True)
        body = config if library == "transformers" else {"_class_name": cls, **config}
        (out / name / "config.json").write_text(json.dumps(body, indent=2))
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    clip_tokenizer.write_builtin_files(out / "tokenizer", pad_token=pad)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


def check_safetensors(path: Path) -> None:
    """InputError naming what is wrong with a .safetensors file's layout: an 8-byte little-endian header
    length, a JSON header mapping tensors to byte ranges, then the data. The safetensors library's
    errors reach users through diffusers as one "Unable to load weights" line; this says which."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: {size} bytes, too short to be a .safetensors file")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise InputError(f"{path}: not a .safetensors file (its first 8 bytes give a header of {n:,} bytes, "
                             f"over the format's {MAX_HEADER:,}); a .ckpt renamed, or another format?")
        if 8 + n > size:
            raise InputError(f"{path}: not a .safetensors file, or truncated: its first 8 bytes give a header of "
                             f"{n:,} bytes, past the end of the file ({size:,} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: not a .safetensors file (its header is not JSON)") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and len(t.get("data_offsets", ())) == 2]
    if not isinstance(header, dict) or not ends:
        raise InputError(f"{path}: a .safetensors file without tensors")
    if 8 + n + max(ends) > size:
        raise InputError(f"{path}: truncated: its tensors end at byte {8 + n + max(ends):,}, the file has {size:,} "
                         "(an interrupted download?)")


def _model_type(path: Path) -> str:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as e:  # safetensors / torch.load errors: a truncated or foreign file
        raise InputError(f"{path}: cannot read it as a checkpoint: {_first_line(e)}") from None
    model_type = infer_diffusers_model_type(checkpoint)
    conv_in = checkpoint.get(CONV_IN)
    if model_type == "v2" and conv_in is not None and conv_in.shape[1] == DEPTH_CHANNELS:
        model_type = "depth_v2"
    if model_type not in ARCHITECTURES:
        raise InputError(f"{path}: a {model_type!r} checkpoint (diffusers' name for it); sdrt exports SD 1.x and "
                         "SD 2.x txt2img, inpainting and depth models (pass --config DIR with a diffusers folder "
                         "of its configs if this one is of that layout)")
    return model_type


def _first_line(e: Exception) -> str:
    return first_line(e).split(" If you want to instead overwrite")[0].rstrip(".")  # diffusers' advice: not for exports


def load(path: Path, workdir: Path, config: Path | None = None):
    """A StableDiffusionPipeline (fp32) from the single file PATH, configured by CONFIG (a diffusers
    folder) or by sdrt's tables for the architecture diffusers detects in the file."""
    import torch
    from diffusers import StableDiffusionPipeline

    if path.suffix.lower() == ".safetensors":
        check_safetensors(path)
    if config is None:
        model_type = _model_type(path)
        what = f"{ARCHITECTURES[model_type][0]} (detected)"
        config = workdir / "single-file-config"
        write_configs(model_type, config)
    else:
        if not (config / "model_index.json").is_file():
            raise InputError(f"--config {config}: expected a diffusers folder (with model_index.json)")
        what = f"the configs in {config}"
    log.info("%s: single-file checkpoint, %s", path, what)
    try:  # an fp16 file loads as fp32 (the modules' dtype); torch_dtype would only add a warning
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # diffusers raises ValueError / RuntimeError / its own types for a mismatch
        raise InputError(f"{path}: does not load as {what}: {_first_line(e)}; for another architecture pass "
                         "--config DIR (a diffusers folder of the same model's configs)") from None
    if any(m.dtype != torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder)):
        pipe.to(torch.float32)
    if (config / "depth_estimator").is_dir():  # a depth model's configs from its diffusers folder: its estimator too
        _attach_depth_estimator(pipe, config)
    return pipe


def _attach_depth_estimator(pipe, folder: Path) -> None:
    """The depth estimator and its image processor of the diffusers folder FOLDER (a single file has none)."""
    from transformers import AutoImageProcessor, DPTForDepthEstimation

    try:
        pipe.depth_estimator = DPTForDepthEstimation.from_pretrained(folder / "depth_estimator").eval()
        pipe.feature_extractor = AutoImageProcessor.from_pretrained(folder / "feature_extractor")
    except (OSError, ValueError) as e:
        raise InputError(f"--config {folder}: could not load its depth estimator: {first_line(e)}") from None
    log.info("the depth estimator from %s", folder)
