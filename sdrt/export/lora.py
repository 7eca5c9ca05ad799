"""LoRA: `sdrt export ... --lora FILE[:SCALE]` fuses LoRA weights into the UNet and text encoder
before export, so the engines run at the base model's speed (nothing extra per step).

diffusers reads the file (its own format, kohya / A1111's, and the other layouts it converts) and
peft fuses it: W += scale * alpha / rank * up @ down for every adapted layer; several LoRAs add up.
The scales are fixed in the engines (another scale is another export); the manifest records each
file's sha256 and scale, and the weights' sha256 is that of the fused weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrt.checksums import sha256_file
from sdrt.errors import InputError, first_line


@dataclass(frozen=True)
class Lora:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Lora:
        """FILE or FILE:SCALE (sdrt.runtime.lora.parse_flag)."""
        from sdrt.runtime.lora import parse_flag

        path, scale = parse_flag(text)
        return cls(Path(path), scale)

    def to_json(self) -> dict:
        return {"file": str(self.path.resolve()), "sha256": sha256_file(self.path), "scale": self.scale}


def _adapted(pipe, name: str) -> int:
    """How many layers of the UNet and text encoder carry adapter NAME."""
    return sum(name in getattr(m, "lora_A", {}) for part in (pipe.unet, pipe.text_encoder) for m in part.modules())


def apply(pipe, loras: list[Lora]) -> list[dict]:
    """Fuse LORAS into PIPE's UNet and text encoder; return the manifest's record of them."""
    if not loras:
        return []
    for lora in loras:
        if not lora.path.is_file():
            raise InputError(f"--lora {lora.path}: no such file")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise InputError("--lora needs peft (pip install 'sdrt[export]')") from None
    from diffusers.utils import logging as diffusers_logging

    names = []
    for i, lora in enumerate(loras):
        name = f"sdrt_lora_{i}"
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # it logs the error it raises as well
        try:
            pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except Exception as e:  # diffusers / peft / safetensors: ValueError, RuntimeError, KeyError ...
            raise InputError(f"--lora {lora.path}: not a LoRA for this model ({first_line(e)})") from None
        finally:
            diffusers_logging.set_verbosity(level)
        if not _adapted(pipe, name):
            raise InputError(f"--lora {lora.path}: none of its weights matches a layer of this model's UNet "
                             "or text encoder (a LoRA for another architecture?)")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # the adapter layers go; the fused weights stay
    return [lora.to_json() for lora in loras]
