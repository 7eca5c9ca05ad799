"""The one declaration of every engine component's inputs and outputs.

Export derives ONNX names and dynamic axes, sample inputs and (later) TensorRT profiles from it; the
manifest records it; the runtime checks shapes against it. Nothing else states these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
DEPTH_ESTIMATOR = "depth_estimator"  # depth2img models' DPT, exported beside the four (depth_spec)


@dataclass(frozen=True)
class Dim:
    """A symbolic dimension `scale * name`, e.g. image height = 8 * latent height."""

    name: str
    scale: int = 1

    def __str__(self) -> str:
        return self.name if self.scale == 1 else f"{self.scale}*{self.name}"

    @classmethod
    def parse(cls, text: str) -> Dim:
        scale, _, name = text.rpartition("*")
        return cls(name, int(scale) if scale else 1)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints and Dims

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else d.scale * sizes[d.name] for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype,
                "shape": [d if isinstance(d, int) else str(d) for d in self.shape]}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        shape = tuple(x if isinstance(x, int) else Dim.parse(x) for x in d["shape"])
        return cls(d["name"], d["dtype"], shape)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict  # symbol -> (min, opt, max)

    def sizes(self, which: str) -> dict[str, int]:
        """Concrete sizes for every symbol: which = "min" | "opt" | "max"."""
        k = ("min", "opt", "max").index(which)
        return {name: r[k] for name, r in self.dims.items()}

    def sample_inputs(self, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs of the declared shapes (token ids within `vocab`); symbols SIZES leaves
        out take their opt value."""
        sizes = self.sizes("opt") | sizes
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.inputs:
            shape = spec.resolve(sizes)
            if spec.dtype == "int64":
                feeds[spec.name] = rng.integers(0, 49406, size=shape, dtype=np.int64)
            elif spec.name == "timestep":
                feeds[spec.name] = rng.uniform(0, 999, size=shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return feeds

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """Raise ValueError naming the input whose rank, fixed dim or dtype disagrees with the spec;
        return the sizes the feeds give each symbol (outputs' shapes resolve with them)."""
        bound: dict[str, int] = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise ValueError(f"{self.name}: missing input {spec.name!r}")
            arr = feeds[spec.name]
            if arr.dtype != np.dtype(spec.dtype) or arr.ndim != len(spec.shape):
                raise ValueError(f"{self.name}.{spec.name}: got {arr.dtype}{list(arr.shape)}, "
                                 f"expected {spec.dtype}{[str(d) for d in spec.shape]}")
            for got, want in zip(arr.shape, spec.shape):
                if isinstance(want, int):
                    ok = got == want
                else:
                    ok = got % want.scale == 0 and bound.setdefault(want.name, got // want.scale) == got // want.scale
                if not ok:
                    raise ValueError(f"{self.name}.{spec.name}: shape {list(arr.shape)} does not fit "
                                     f"{[str(d) for d in spec.shape]}")
        return bound

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "dims": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.dims.items()}}

    @classmethod
    def from_json(cls, name: str, d: dict) -> ComponentSpec:
        return cls(name, tuple(TensorSpec.from_json(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_json(t) for t in d["outputs"]),
                   {k: (v["min"], v["opt"], v["max"]) for k, v in d["dims"].items()})


@dataclass(frozen=True)
class ModelDims:
    """The architecture facts the shapes depend on (read from the source's configs at export)."""

    text_length: int  # tokenizer max length (77)
    text_hidden: int  # CLIP hidden size (768 for SD 1.x)
    text_layers: int  # CLIP layers; the text encoder returns every layer for clip_skip
    unet_in_channels: int  # 4 for txt2img, 9 for inpainting UNets, 5 for depth2img (latents + depth)
    latent_channels: int  # VAE latent channels (4)
    vae_scale_factor: int  # 2 ** (len(vae.block_out_channels) - 1)


BATCH = (1, 2, 8)  # min/opt/max batch: opt 2 is one prompt with classifier-free guidance
# min/opt/max 77-token chunks of the UNet's text conditioning (A1111's long prompts, BREAK): 64 hold
# 4,800 prompt tokens. ONNX graphs take any count (the bound is torch.export's); TensorRT engines take
# their profile's (sdrt.export.tensorrt.Profile.chunks)
CHUNKS = (1, 1, 64)
IMAGE_PX = (64, 512, 2048)  # min/opt/max image side in pixels


def component_specs(m: ModelDims) -> dict[str, ComponentSpec]:
    f = m.vae_scale_factor
    B, h, w = Dim("B"), Dim("h"), Dim("w")
    latent_dims = {"B": BATCH, "h": tuple(max(2, px // f) for px in IMAGE_PX),
                   "w": tuple(max(2, px // f) for px in IMAGE_PX)}
    H, W = Dim("h", f), Dim("w", f)
    latent = (B, m.latent_channels, h, w)
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            (TensorSpec("input_ids", "int64", (B, m.text_length)),),
            # every layer's output after the final LayerNorm: [-1] is clip_skip 1, [-2] clip_skip 2
            (TensorSpec("hidden_states", "float32", (m.text_layers, B, m.text_length, m.text_hidden)),),
            {"B": BATCH}),
        "unet": ComponentSpec(
            "unet",
            (TensorSpec("sample", "float32", (B, m.unet_in_channels, h, w)),
             TensorSpec("timestep", "float32", (B,)),
             TensorSpec("encoder_hidden_states", "float32", (B, Dim("c", m.text_length), m.text_hidden))),
            (TensorSpec("out_sample", "float32", latent),),
            latent_dims | {"c": CHUNKS}),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            (TensorSpec("latent", "float32", latent),),
            (TensorSpec("image", "float32", (B, 3, H, W)),),
            latent_dims),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", "float32", (B, 3, H, W)),),
            # the posterior N(mean, std^2); the runtime draws the sample with its own seeded noise
            (TensorSpec("latent_mean", "float32", latent), TensorSpec("latent_std", "float32", latent)),
            latent_dims),
    }


def cache_specs(unet: ComponentSpec, feature: TensorSpec) -> tuple[ComponentSpec, ComponentSpec]:
    """Feature caching's two UNet graphs (sdrt.kernels.deepcache): the full one outputs FEATURE beside
    the UNet's output, the shallow one takes it beside the UNet's inputs."""
    return (ComponentSpec(unet.name, unet.inputs, (*unet.outputs, feature), unet.dims),
            ComponentSpec(unet.name, (*unet.inputs, feature), unet.outputs, unet.dims))


# the UNet inputs both halves of a classifier-free guidance batch share ([x; x], [t; t])
GUIDED_SHARED = ("sample", "timestep")


def guided_spec(unet: ComponentSpec, shared: tuple[str, ...] = GUIDED_SHARED) -> ComponentSpec:
    """A UNet graph's guided variant (sdrt.kernels.guidance): the SHARED inputs keep the batch B, every
    other input and output whose batch is B takes both halves, 2 * B."""
    def doubled(t: TensorSpec) -> TensorSpec:
        b = t.shape[0]
        if t.name in shared or not isinstance(b, Dim):
            return t
        return TensorSpec(t.name, t.dtype, (Dim(b.name, 2 * b.scale), *t.shape[1:]))

    return ComponentSpec(unet.name, tuple(map(doubled, unet.inputs)), tuple(map(doubled, unet.outputs)), unet.dims)


def depth_spec(height: int, width: int, out_height: int, out_width: int) -> ComponentSpec:
    """The depth estimator: its image processor's fixed-size pixel values -> a depth map per image
    (sdrt.runtime.depth). DPT's position embeddings fix the input size, so only the batch varies."""
    B = Dim("B")
    return ComponentSpec(
        DEPTH_ESTIMATOR,
        (TensorSpec("pixel_values", "float32", (B, 3, height, width)),),
        (TensorSpec("predicted_depth", "float32", (B, out_height, out_width)),),
        {"B": BATCH})
