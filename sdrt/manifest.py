"""`manifest.json`: what an engine directory holds. Written by export, read by the runtime."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.components import COMPONENTS, ComponentSpec, ModelDims
from sdrt.errors import InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TargetGraph:
    """The component's graph rewritten for one target (sdrt.kernels), sharing the weights file."""
    file: str  # relative to the engine dir
    fused: dict[str, int]  # rewrite pass -> nodes it rewrote
    parity_max_abs: float | None = None  # vs the PyTorch module, at export

    def to_json(self) -> dict:
        return {"file": self.file, "fused": self.fused, "parity": {"max_abs_error": self.parity_max_abs}}

    @classmethod
    def from_json(cls, d: dict) -> TargetGraph:
        return cls(str(d["file"]), {str(k): int(v) for k, v in d.get("fused", {}).items()},
                   d.get("parity", {}).get("max_abs_error"))


@dataclass
class ComponentEntry:
    spec: ComponentSpec
    files: list[str]  # relative to the engine dir; the first is the one to load
    backend: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "fp16" | ...
    optimizations: list[str] = field(default_factory=list)
    parity_max_abs: float | None = None  # vs the PyTorch module on sample inputs, at export
    parity_tolerance: float | None = None
    targets: dict[str, TargetGraph] = field(default_factory=dict)  # target -> its rewritten graph

    def file_for(self, targets: str | tuple[str, ...] | None) -> str:
        """The graph to run for TARGETS (a target, or targets in order of preference): the first
        rewritten graph the export made, else the standard one."""
        for t in (targets,) if isinstance(targets, str) else targets or ():
            if t in self.targets:
                return self.targets[t].file
        return self.files[0]

    def to_json(self) -> dict:
        d = {"files": self.files, "backend": self.backend, "precision": self.precision,
             "optimizations": self.optimizations,
             "parity": {"max_abs_error": self.parity_max_abs, "tolerance": self.parity_tolerance},
             "targets": {k: v.to_json() for k, v in self.targets.items()}}
        d.update(self.spec.to_json())
        return d

    @classmethod
    def from_json(cls, name: str, d: dict) -> ComponentEntry:
        parity = d.get("parity", {})
        return cls(ComponentSpec.from_json(name, d), list(d["files"]), d["backend"], d["precision"],
                   list(d.get("optimizations", [])), parity.get("max_abs_error"), parity.get("tolerance"),
                   {str(k): TargetGraph.from_json(v) for k, v in d.get("targets", {}).items()})


@dataclass
class Manifest:
    source: dict  # {"kind", "name", "sha256"}
    pipeline: str  # "txt2img" (an inpainting UNet: "inpaint")
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    vae_scaling_factor: float  # latents = scaling_factor * vae.encode(x); applied inside the VAE graphs
    dims: ModelDims
    scheduler_config: dict  # the source's scheduler config, as diffusers saved it
    components: dict[str, ComponentEntry]
    default_image_size: int = 512  # the UNet's training resolution in pixels
    tokenizer_dir: str = TOKENIZER_DIR
    format_version: int = FORMAT_VERSION
    exporter: dict = field(default_factory=dict)  # versions of the tools that made it

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version, "source": self.source, "pipeline": self.pipeline,
            "prediction_type": self.prediction_type, "vae_scaling_factor": self.vae_scaling_factor,
            "vae_scale_factor": self.dims.vae_scale_factor, "latent_channels": self.dims.latent_channels,
            "unet_in_channels": self.dims.unet_in_channels,
            "default_image_size": self.default_image_size, "dims": asdict(self.dims),
            "scheduler_config": self.scheduler_config, "tokenizer_dir": self.tokenizer_dir,
            "exporter": self.exporter,
            "components": {k: v.to_json() for k, v in self.components.items()},
        }

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Load and validate; every problem is an InputError naming the directory and what is wrong."""
        d = Path(directory)
        path = d / MANIFEST
        if not d.is_dir():
            raise InputError(f"engine dir {d} does not exist")
        if not path.is_file():
            raise InputError(f"{d} is not an engine dir: no {MANIFEST} (run `sdrt export` first)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path} is corrupt: {e}") from None
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            got = raw.get("format_version") if isinstance(raw, dict) else None
            raise InputError(f"{path}: format_version {got!r}, this sdrt reads {FORMAT_VERSION}")
        try:
            m = cls(source=raw["source"], pipeline=raw["pipeline"], prediction_type=raw["prediction_type"],
                    vae_scaling_factor=float(raw["vae_scaling_factor"]), dims=ModelDims(**raw["dims"]),
                    scheduler_config=raw["scheduler_config"],
                    components={k: ComponentEntry.from_json(k, v) for k, v in raw["components"].items()},
                    default_image_size=int(raw.get("default_image_size", 512)),
                    tokenizer_dir=raw.get("tokenizer_dir", TOKENIZER_DIR), exporter=raw.get("exporter", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{path} is corrupt: bad or missing field {e}") from None
        for name in COMPONENTS:
            if name in m.components:
                c = m.components[name]
                for f in c.files + [t.file for t in c.targets.values()]:
                    if not (d / f).is_file():
                        raise InputError(f"{d}: {name} file {f} is missing")
        return m
