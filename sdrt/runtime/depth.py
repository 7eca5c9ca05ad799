"""depth2img's depth condition in NumPy, as diffusers' StableDiffusionDepth2ImgPipeline makes it.

The init image goes through the depth estimator's image processor (transformers' DPTImageProcessor:
PIL resize, rescale, normalize; `Processor`), the estimator engine (DPT, exported at its processor's
fixed input size) gives a depth map, or the user gives one (`depth_map=`). Either is resized to the
latent size with torch's bicubic interpolation (`resize_bicubic`) and scaled to [-1, 1] per image
(`normalize`); the UNet takes it as a fifth input channel beside the latents.

Depth maps are inverse depth, as DPT / MiDaS predict them: larger values are nearer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdrt.errors import InputError

CUBIC_A = -0.75  # torch's bicubic coefficient (upsample_bicubic2d)


@dataclass(frozen=True)
class Processor:
    """The image-processor settings of a depth estimator (the fields of transformers' DPTImageProcessor
    that sdrt reproduces; export refuses the others: aspect-preserving resizes and padding)."""

    height: int
    width: int
    resample: int = 3  # PIL's resampling filter code (3: bicubic)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Processor:
        p = cls(**{**d, "image_mean": tuple(d.get("image_mean", (0.5,) * 3)),
                   "image_std": tuple(d.get("image_std", (0.5,) * 3))})
        if not (isinstance(p.height, int) and isinstance(p.width, int) and p.height > 0 and p.width > 0):
            raise ValueError(f"depth_processor size {p.height}x{p.width}")
        if len(p.image_mean) != 3 or len(p.image_std) != 3 or not all(s > 0 for s in p.image_std):
            raise ValueError("depth_processor image_mean / image_std: three values each, std positive")
        return p

    def __call__(self, image) -> np.ndarray:
        """A PIL image -> the estimator's (1, 3, height, width) float32 pixel values, as the processor
        makes them (PIL resize of the uint8 image; rescale in float64, then float32; normalize)."""
        from PIL import Image

        image = image.convert("RGB")
        if self.do_resize:
            image = image.resize((self.width, self.height), Image.Resampling(self.resample))
        x = np.asarray(image).transpose(2, 0, 1)
        if x.shape[1:] != (self.height, self.width):
            raise InputError(f"depth estimator: a {x.shape[2]}x{x.shape[1]} image, it takes "
                             f"{self.width}x{self.height} (its processor does not resize)")
        x = x.astype(np.float64) * self.rescale_factor if self.do_rescale else x
        x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)[:, None, None]
            x = (x - mean) / np.asarray(self.image_std, np.float32)[:, None, None]
        return x[None]


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n,) fractions -> (n, 4) weights of the samples at floor - 1 .. floor + 2 (Keys, A = -0.75)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): torch's bicubic interpolation along one axis, align_corners=False, no antialias:
    source = (dst + 0.5) * n_in / n_out - 0.5, samples past the edges clamped to it."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)
    m = np.zeros((n_out, n_in))
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), w[:, k])
    return m


def resize_bicubic(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W) -> (N, height, width) float64, as torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False) (separable: rows, then columns)."""
    depth = np.asarray(depth, np.float64)
    rows, cols = _resize_matrix(depth.shape[1], height), _resize_matrix(depth.shape[2], width)
    return np.einsum("oh,nhw,pw->nop", rows, depth, cols)


def normalize(depth: np.ndarray) -> np.ndarray:
    """Each map scaled to [-1, 1] by its own minimum and maximum (diffusers' prepare_depth_map)."""
    lo = depth.min(axis=(1, 2), keepdims=True)
    hi = depth.max(axis=(1, 2), keepdims=True)
    if np.any(hi <= lo) or not np.all(np.isfinite(depth)):
        raise InputError("depth map: it is constant or not finite, so it gives no depth "
                         "(a blank image, or an estimator that saw nothing?)")
    return 2.0 * (depth - lo) / (hi - lo) - 1.0


def condition(depth: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """(1, H, W) depth -> the UNet's depth channel (1, 1, h, w) in [-1, 1], float32 as diffusers casts it."""
    return normalize(resize_bicubic(depth, latent_height, latent_width))[:, None].astype(np.float32)


def load_depth_map(value) -> np.ndarray:
    """A user's depth map -> (1, H, W) float32: a path or PIL image of one channel (8- or 16-bit
    grayscale, or RGB with equal channels), or an (H, W) / (1, H, W) array. Anything else is an
    InputError naming what it got."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, (str, Path)):
        try:
            with Image.open(value) as im:
                im.load()
                value = im.copy()
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"depth map {value}: not an image ({e})") from None
    if isinstance(value, Image.Image):
        value = _image_depth(value)
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.dtype.kind not in "fiub" or min(arr.shape) < 2:
        raise InputError(f"depth map: expected one channel, (H, W) or (1, H, W), got an array of shape "
                         f"{arr.shape} and dtype {arr.dtype}")
    return arr.astype(np.float32)[None]


def _image_depth(im) -> np.ndarray:
    if im.mode in ("L", "I", "I;16", "I;16B", "F"):
        return np.asarray(im).astype(np.float32)
    if im.mode in ("RGB", "RGBA", "LA", "P"):
        rgb = np.asarray(im.convert("RGB")).astype(np.float32)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0]
        raise InputError("depth map: a color image; a depth map is one channel (grayscale, white = near). "
                         "A colorized depth visualization can't be read back as depth")
    raise InputError(f"depth map: an image of mode {im.mode}, expected grayscale (8 or 16 bit)")
