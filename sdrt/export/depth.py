"""depth2img checkpoints' depth estimator (DPT from transformers, e.g. DPT-Hybrid MiDaS in
stabilityai/stable-diffusion-2-depth): its image-processor settings for the manifest and its
component spec. The runtime reproduces the processor in NumPy (sdrt.runtime.depth)."""

from __future__ import annotations

import math

from sdrt.components import ComponentSpec, depth_spec
from sdrt.errors import InputError
from sdrt.runtime.depth import Processor


def estimator(pipe):
    """The source's depth estimator, or None (not a depth model, or a single file, which has none)."""
    return getattr(pipe, "depth_estimator", None)


def processor(pipe) -> Processor:
    """The settings of the source's DPTImageProcessor that decide the estimator's input. Those sdrt does
    not reproduce (aspect-preserving resizes, padding: a different input size per image) are refused."""
    fe = getattr(pipe, "feature_extractor", None)
    if fe is None:
        raise InputError("the depth estimator has no image processor (feature_extractor/) in the source")
    d = fe.to_dict()
    if d.get("keep_aspect_ratio") or d.get("do_pad"):
        raise InputError("the depth estimator's image processor keeps the aspect ratio or pads (input sizes "
                         "that vary per image); sdrt exports processors that resize to a fixed size")
    size, multiple = d.get("size") or {}, int(d.get("ensure_multiple_of") or 1)
    if not {"height", "width"} <= set(size):
        raise InputError(f"the depth estimator's image processor has size {size}; sdrt needs height and width")
    h, w = (_multiple_of(size[k], multiple) for k in ("height", "width"))
    return Processor(h, w, int(d.get("resample", 3)), bool(d.get("do_resize", True)),
                     bool(d.get("do_rescale", True)), float(d.get("rescale_factor", 1 / 255)),
                     bool(d.get("do_normalize", True)), tuple(float(x) for x in d.get("image_mean", (0.5,) * 3)),
                     tuple(float(x) for x in d.get("image_std", (0.5,) * 3)))


def _multiple_of(v: int, multiple: int) -> int:
    """transformers' DPT constrain_to_multiple_of at scale 1 (no maximum, no minimum)."""
    return round(v / multiple) * multiple if multiple > 1 else int(v)


def spec(pipe, proc: Processor) -> ComponentSpec:
    """The estimator's spec at the processor's size; its output size is what the model gives for it."""
    import torch

    x = torch.zeros(1, 3, proc.height, proc.width)
    try:
        with torch.no_grad():
            out = estimator(pipe)(pixel_values=x).predicted_depth
    except (ValueError, RuntimeError) as e:
        raise InputError(f"the depth estimator does not take its processor's {proc.width}x{proc.height} "
                         f"images: {e}") from None
    if out.ndim != 3 or math.prod(out.shape[1:]) < 4:
        raise InputError(f"the depth estimator gives {tuple(out.shape)}, not a (batch, height, width) depth map")
    return depth_spec(proc.height, proc.width, int(out.shape[1]), int(out.shape[2]))
