"""Model sources `sdrt export` reads: a diffusers folder, a single file (.safetensors / .ckpt;
sdrt.export.single_file), a hub id, `tiny`, `random-sd15`.

Everything here loads PyTorch modules through diffusers / transformers; the built-in models are
built from configs with seeded random weights and the real CLIP tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from sdrt import tokenizer as clip_tokenizer
from sdrt.errors import InputError, SdrtError
from sdrt.export import single_file
from sdrt.export.architectures import BUILTIN, BUILTIN_SEED, SD15_SCHEDULER

log = logging.getLogger(__name__)

@dataclass
class Loaded:
    """A source's PyTorch modules plus what the manifest records about it."""

    pipe: object  # diffusers.StableDiffusionPipeline (safety checker removed)
    kind: str  # "builtin" | "diffusers" | "single-file" | "hub"
    name: str

    @property
    def scheduler_config(self) -> dict:
        return {k: v for k, v in dict(self.pipe.scheduler.config).items() if not k.startswith("_")} | {
            "_class_name": type(self.pipe.scheduler).__name__}


def build_builtin(name: str, workdir: Path):
    """A StableDiffusionPipeline with the `name` architecture and weights seeded by BUILTIN_SEED."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = BUILTIN[name]
    tok_dir = workdir / "tokenizer"
    clip_tokenizer.write_builtin_files(tok_dir)
    torch.manual_seed(BUILTIN_SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
                                                **cfg["text_encoder"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), unet=unet.eval(),
                                   tokenizer=CLIPTokenizer.from_pretrained(tok_dir), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe


def _from_pretrained(ref: str, **kw):
    """The folder's pipeline: a depth2img one (with its depth estimator) where its model_index names
    one, else StableDiffusionPipeline (inpainting folders load as one: the modules are the same)."""
    from diffusers import DiffusionPipeline, StableDiffusionDepth2ImgPipeline, StableDiffusionPipeline

    if "depth_estimator" in DiffusionPipeline.load_config(ref, **kw):
        return StableDiffusionDepth2ImgPipeline.from_pretrained(ref, torch_dtype=None, **kw)
    return StableDiffusionPipeline.from_pretrained(ref, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=None, **kw)


def _hub_id_shaped(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/"))


def is_source(source: str) -> bool:
    """Whether SOURCE names a checkpoint `load_source` would try: a built-in name, a diffusers
    folder, a single-file checkpoint, or something shaped like a hub id (org/name) that is not a local path."""
    path = Path(source)
    if source in BUILTIN or (path / "model_index.json").is_file() or single_file.is_single_file(path):
        return True
    return not path.exists() and _hub_id_shaped(source)


def load_source(source: str, workdir: Path, config: Path | None = None) -> Loaded:
    """Resolve SOURCE into PyTorch modules. Raises InputError when SOURCE is not a checkpoint.
    CONFIG: a diffusers folder whose configs describe a single-file SOURCE (default: detected)."""
    path = Path(source)
    if config is not None and not single_file.is_single_file(path):
        raise InputError(f"--config is for single-file checkpoints ({', '.join(single_file.SUFFIXES)}); "
                         f"{source} is not one")
    if source in BUILTIN:
        return Loaded(build_builtin(source, workdir), "builtin", source)
    if single_file.is_single_file(path):
        return Loaded(single_file.load(path, workdir, config), "single-file", str(path.resolve()))
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"{source} is not a checkpoint: expected a diffusers folder with model_index.json, "
                             f"a {' or '.join(single_file.SUFFIXES)} file, or one of the built-in names "
                             f"{sorted(BUILTIN)}")
        try:
            pipe = _from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{source}: could not load the diffusers folder: {e}") from None
        return Loaded(pipe, "diffusers", str(path.resolve()))
    if _hub_id_shaped(source):
        try:
            pipe = _from_pretrained(source)
        except Exception as e:  # network, auth or missing repo: all reported the same way
            raise SdrtError(f"could not load {source!r} from the Hugging Face hub: {e}") from None
        return Loaded(pipe, "hub", source)
    raise InputError(f"{source!r} is not a checkpoint: no such file or folder, not a hub id (org/name), "
                     f"and not a built-in model ({', '.join(sorted(BUILTIN))})")


def content_hash(pipe) -> str:
    """sha256 over every weight of text encoder, UNet and VAE (names, dtypes, values), and of the
    depth estimator where there is one."""
    h = hashlib.sha256()
    for part in (pipe.text_encoder, pipe.unet, pipe.vae, getattr(pipe, "depth_estimator", None)):
        if part is not None:
            hash_weights(h, part)
    return h.hexdigest()


def hash_weights(h, module) -> None:
    """Feed a torch module's weights (names, dtypes, shapes, values) into hash H."""
    for key, tensor in sorted(module.state_dict().items()):
        h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
