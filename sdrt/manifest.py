"""`manifest.json`: what an engine directory holds. Written by export, read by the runtime."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.components import DEPTH_ESTIMATOR, ComponentSpec, ModelDims, TensorSpec, component_specs, depth_spec
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
class FeatureCache:
    """A UNet graph's feature-caching pair (sdrt.kernels.deepcache), sharing its weights file."""
    full: str  # also outputs `feature`; relative to the engine dir
    shallow: str  # takes `feature` in
    feature: TensorSpec
    # the initializers the shallow graph keeps (ONNX Runtime refuses replacements for others: LoRAs)
    shallow_weights: list[str] = field(default_factory=list)
    parity_max_abs: float | None = None  # shallow(full's feature) vs the graph itself, at export

    def to_json(self) -> dict:
        return {"full": self.full, "shallow": self.shallow, "feature": self.feature.to_json(),
                "shallow_weights": self.shallow_weights, "parity": {"max_abs_error": self.parity_max_abs}}

    @classmethod
    def from_json(cls, d: dict) -> FeatureCache:
        return cls(str(d["full"]), str(d["shallow"]), TensorSpec.from_json(d["feature"]),
                   [str(x) for x in d.get("shallow_weights", [])], d.get("parity", {}).get("max_abs_error"))


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
    # where each adaptable layer's weight is in the graphs (sdrt.export.weight_map), for LoRAs per
    # request; relative to the engine dir. None: not recorded (older exports, int8, TensorRT engines)
    weight_map: str | None = None
    # the UNet's feature-caching graphs (cache_interval): graph file they derive from -> its pair
    feature_cache: dict[str, FeatureCache] = field(default_factory=dict)
    # UNet graph file -> its guided variant, computing what both halves of a guided batch share once
    # (sdrt.kernels.guidance)
    guided: dict[str, str] = field(default_factory=dict)

    def graph_files(self) -> list[str]:
        """Its files, its targets' graphs, its feature-caching and guided graphs (not the weight map)."""
        return (self.files + [t.file for t in self.targets.values()]
                + [f for c in self.feature_cache.values() for f in (c.full, c.shallow)]
                + list(self.guided.values()))

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
        if self.weight_map:
            d["weight_map"] = self.weight_map
        if self.feature_cache:
            d["feature_cache"] = {k: v.to_json() for k, v in self.feature_cache.items()}
        if self.guided:
            d["guided"] = dict(self.guided)
        d.update(self.spec.to_json())
        return d

    @classmethod
    def from_json(cls, name: str, d: dict) -> ComponentEntry:
        parity = d.get("parity", {})
        return cls(ComponentSpec.from_json(name, d), list(d["files"]), d["backend"], d["precision"],
                   list(d.get("optimizations", [])), parity.get("max_abs_error"), parity.get("tolerance"),
                   {str(k): TargetGraph.from_json(v) for k, v in d.get("targets", {}).items()},
                   d.get("weight_map"),
                   {str(k): FeatureCache.from_json(v) for k, v in d.get("feature_cache", {}).items()},
                   {str(k): str(v) for k, v in d.get("guided", {}).items()})


@dataclass
class Manifest:
    source: dict  # {"kind", "name", "sha256"}
    pipeline: str  # "txt2img"; "inpaint" (a 9-channel UNet), "depth2img" (a 5-channel one)
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    vae_scaling_factor: float  # latents = scaling_factor * vae.encode(x); applied inside the VAE graphs
    dims: ModelDims
    scheduler_config: dict  # the source's scheduler config, as diffusers saved it
    components: dict[str, ComponentEntry]
    default_image_size: int = 512  # the UNet's training resolution in pixels
    tokenizer_dir: str = TOKENIZER_DIR
    format_version: int = FORMAT_VERSION
    exporter: dict = field(default_factory=dict)  # versions of the tools that made it
    # every file of the engine dir but the manifest: relative path -> {"size": bytes, "sha256": hex};
    # empty in engine dirs exported before sdrt recorded them (then only presence is checked)
    files: dict[str, dict] = field(default_factory=dict)
    # depth2img: the depth estimator's image-processor settings (sdrt.runtime.depth.Processor); None
    # where the export had no estimator (single-file depth checkpoints: users give depth maps)
    depth_processor: object = None
    # where the text encoder's token table is, for its `embeds` graph (textual inversion): {"file"
    # (relative to the engine dir), "offset" (bytes), "shape" [vocab, width], "dtype"}; None in engine
    # dirs exported before it
    token_table: dict | None = None

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version, "source": self.source, "pipeline": self.pipeline,
            "prediction_type": self.prediction_type, "vae_scaling_factor": self.vae_scaling_factor,
            **{k: getattr(self.dims, k) for k in TOP_LEVEL_DIMS},
            "default_image_size": self.default_image_size,
            "dims": {k: v for k, v in asdict(self.dims).items() if k not in TOP_LEVEL_DIMS},
            "scheduler_config": self.scheduler_config, "tokenizer_dir": self.tokenizer_dir,
            "exporter": self.exporter,
            "components": {k: v.to_json() for k, v in self.components.items()},
            "files": self.files,
        } | ({"depth_processor": self.depth_processor.to_json()} if self.depth_processor else {}) | (
            {"token_table": self.token_table} if self.token_table else {})

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @property
    def image_px(self) -> tuple[int, int]:
        """The smallest and largest image side a request may ask for, in pixels: one latent pixel up
        to the UNet's declared maximum. (ONNX graphs run below the declared minimum, which is where
        export samples its inputs; TensorRT engines refuse shapes outside their own profile.)"""
        f = self.dims.vae_scale_factor
        return f, self.components["unet"].spec.dims["h"][2] * f

    @classmethod
    def read(cls, directory: str | Path, verify: bool = False) -> Manifest:
        """Load and validate; every problem is an InputError naming the directory and what is wrong.
        File sizes are always checked; verify=True also checks every file's sha256 (sdrt verify)."""
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
            m = cls._from_json(raw)
        except FieldError as e:
            raise InputError(f"{path} is corrupt: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{path} is corrupt: bad or missing field {e}") from None
        m.check_files(d, verify)
        return m

    @classmethod
    def _from_json(cls, raw: dict) -> Manifest:
        from sdrt.runtime.denoiser import PREDICTION_TYPES

        given = raw["dims"] | {k: raw[k] for k in TOP_LEVEL_DIMS if k in raw}  # older manifests: both places
        dims = ModelDims(**{k: _positive_int(k if k in TOP_LEVEL_DIMS else f"dims.{k}", v) for k, v in given.items()})
        m = cls(source=raw["source"], pipeline=_choice("pipeline", raw["pipeline"], PIPELINES),
                prediction_type=_choice("prediction_type", raw["prediction_type"], PREDICTION_TYPES),
                vae_scaling_factor=_positive_number("vae_scaling_factor", raw["vae_scaling_factor"]), dims=dims,
                scheduler_config=_scheduler_config(raw["scheduler_config"]),
                components={k: ComponentEntry.from_json(k, v) for k, v in raw["components"].items()},
                default_image_size=_positive_int("default_image_size", raw.get("default_image_size", 512)),
                tokenizer_dir=raw.get("tokenizer_dir", TOKENIZER_DIR), exporter=raw.get("exporter", {}),
                files=raw.get("files", {}), depth_processor=_depth_processor(raw.get("depth_processor")),
                token_table=_token_table(raw.get("token_table")))
        if m.default_image_size % dims.vae_scale_factor:
            raise FieldError(f"default_image_size {m.default_image_size} is not a multiple of "
                             f"vae_scale_factor {dims.vae_scale_factor}")
        _check_specs(m.components, dims)
        return m

    def check_files(self, d: Path, verify: bool = False, progress=None) -> None:
        """Every file the manifest names exists with its recorded size (and sha256 if verify);
        InputError naming the first that does not."""
        from sdrt.checksums import sha256_file

        for name, c in self.components.items():
            for f in c.graph_files():
                if not (d / f).is_file():
                    raise InputError(f"{d}: {name} file {f} is missing")
        for f, rec in self.files.items():
            p = d / f
            if not p.is_file():
                raise InputError(f"{d}: {f} is missing (sdrt verify {d})")
            size = p.stat().st_size
            if size != rec["size"]:
                raise InputError(f"{d}: {f} has {size:,} bytes, the manifest records {rec['size']:,} "
                                 "(truncated or replaced; re-export)")
            if verify and sha256_file(p, progress) != rec["sha256"]:
                raise InputError(f"{d}: {f} is corrupt: its sha256 differs from the one recorded at export")


PIPELINES = ("txt2img", "inpaint", "depth2img")
# ModelDims fields the manifest states at its top level (the engine-dir facts users read); the rest
# are under "dims"
TOP_LEVEL_DIMS = ("vae_scale_factor", "latent_channels", "unet_in_channels")


class FieldError(ValueError):
    """A manifest value of the wrong kind; the message names the field."""


def file_records(directory: Path, skip: tuple[str, ...] = (), progress=None) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} for every file under DIRECTORY but the manifest and SKIP."""
    from sdrt.checksums import sha256_file

    d = Path(directory)
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in skip:
            out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p, progress)}
    return out


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise FieldError(f"{name} must be a positive integer, got {v!r}")
    return v


def _positive_number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise FieldError(f"{name} must be a positive number, got {v!r}")
    return float(v)


def _choice(name: str, v, choices) -> str:
    if v not in choices:
        raise FieldError(f"{name} must be one of {', '.join(choices)}, got {v!r}")
    return v


def _token_table(d):
    if d is None:
        return None
    ok = (isinstance(d, dict) and isinstance(d.get("file"), str) and isinstance(d.get("offset"), int)
          and d.get("dtype") in ("float32", "float16") and isinstance(d.get("shape"), list) and len(d["shape"]) == 2
          and all(isinstance(x, int) and x > 0 for x in d["shape"]))
    if not ok:
        raise FieldError(f"token_table: expected file, offset, shape [vocab, width], dtype; got {d!r}")
    return d


def _depth_processor(d):
    from sdrt.runtime.depth import Processor

    if d is None:
        return None
    try:
        return Processor.from_json(d)
    except (TypeError, ValueError, AttributeError) as e:
        raise FieldError(f"depth_processor: {e}") from None


def _scheduler_config(config) -> dict:
    if not isinstance(config, dict):
        raise FieldError(f"scheduler_config must be an object, got {config!r}")
    _positive_int("scheduler_config.num_train_timesteps", config.get("num_train_timesteps", 1000))
    for k in ("beta_start", "beta_end"):
        if k in config:
            _positive_number(f"scheduler_config.{k}", config[k])
    return config


def _check_specs(components: dict[str, ComponentEntry], dims: ModelDims) -> None:
    """Each component's declared inputs and outputs are the ones sdrt's components have."""
    expected = component_specs(dims) | {DEPTH_ESTIMATOR: depth_spec(1, 1, 1, 1)}  # its names; its sizes vary
    for name, c in components.items():
        if name not in expected:
            raise FieldError(f"components.{name}: not a component sdrt knows ({', '.join(expected)})")
        want = expected[name]
        for kind in ("inputs", "outputs"):
            got, exp = [t.name for t in getattr(c.spec, kind)], [t.name for t in getattr(want, kind)]
            if got != exp:
                raise FieldError(f"components.{name}.{kind}: names {got}, expected {exp}")
