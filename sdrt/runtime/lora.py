"""LoRAs applied per request, without re-export (NumPy only).

A LoRA file holds, per adapted layer, a low-rank pair (down: r x in, up: out x r) and an alpha; the
layer's weight becomes W + weight * alpha / r * up @ down (the formula diffusers/peft fuse with), and
several LoRAs add up. The export records where each adaptable layer's weight sits in the ONNX graphs
(its `weight_map`, sdrt.export.weight_map): the initializer's name, whether the graph holds it
transposed (a MatMul's), and its bytes in the weights file. `merged` computes the new initializers
from those bytes; the backend creates its session over them (ONNX Runtime's external initializers),
so every graph rewrite and constant fold of the export and of ONNX Runtime sees the new values. The
base weights are read again for every set: A -> B -> A gives A's arrays bit for bit.

Formats: kohya / A1111 (`lora_unet_*`, `lora_te_*`, `.lora_down` / `.lora_up` / `.alpha`, LoCon's
convolution layers too) and diffusers / peft (`unet.*` / `text_encoder.*` with `.lora_A` / `.lora_B`,
`.lora.down` / `.lora.up`, or attention-processor names; alpha from `lora_adapter_metadata`, else r).
LyCORIS's other algorithms (LoHa, LoKr, DoRA) are refused by name.

Files are `.safetensors` (read here with their header, as NumPy has no bfloat16 for safetensors'
numpy reader) or torch's zip `.pt` / `.ckpt` (the embeddings' restricted unpickler).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.errors import InputError

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pt", ".ckpt")
COMPONENTS = ("unet", "text_encoder")
NETWORKS = ("lora", "lyco")  # A1111's extra-network names that mean a LoRA file
_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tag
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}
_REFUSED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_mid": "LoCon with a Tucker core"}


@dataclass(frozen=True)
class Use:
    """One LoRA of a request: its file and the weights for the text encoder and the UNet."""
    path: Path
    te: float = 1.0
    unet: float = 1.0
    name: str = ""  # as the prompt named it (A1111's `Lora hashes` key); default the file's stem

    @property
    def key(self) -> tuple:
        return (str(self.path.resolve()), self.te, self.unet)


@dataclass(frozen=True)
class Layer:
    down: np.ndarray  # (r, in, ...) float32
    up: np.ndarray  # (out, r, ...) float32
    scale: float  # alpha / r

    def delta(self) -> np.ndarray:
        """up @ down * alpha / r, (out, in * k * k) as float32 (LoCon: a k x k down, a 1 x 1 up)."""
        r = self.down.shape[0]
        return (self.up.reshape(len(self.up), r) @ self.down.reshape(r, -1)) * np.float32(self.scale)


# -- prompts ----------------------------------------------------------------------------------

def split_prompt(text: str, lora_dir: Path | None) -> tuple[str, list[Use]]:
    """A1111's extra-network tags out of TEXT: the prompt without them, and the LoRAs they name
    (`<lora:NAME>`, `<lora:NAME:W>`, `<lora:NAME:TE_W:UNET_W>`, `te=` / `unet=` named; `lyco` alike).
    NAME is a file in LORA_DIR (its stem, or a path under it)."""
    uses = []

    def found(m: re.Match) -> str:
        kind, items = m.group(1), m.group(2).split(":")
        if kind not in NETWORKS:
            raise InputError(f"prompt: <{kind}:...> is not an extra network sdrt runs (it runs "
                             f"{', '.join(f'<{n}:NAME:WEIGHT>' for n in NETWORKS)})")
        uses.append(_use_from_tag(items, lora_dir))
        return ""

    return _TAG.sub(found, text), uses


def strip_tags(text: str) -> str:
    """TEXT without its extra-network tags (what the text encoder sees)."""
    return _TAG.sub("", text)


def _use_from_tag(items: list[str], lora_dir: Path | None) -> Use:
    name, positional, named = items[0].strip(), [], {}
    for item in items[1:]:
        k, eq, v = item.partition("=")
        if eq:
            named[k.strip()] = v
        else:
            positional.append(item)
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
    except ValueError:
        te = unet = math.nan
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise InputError(f"prompt: <lora:{':'.join(items)}>: the weights must be finite numbers")
    return Use(find(name, lora_dir), te, unet, name)


def find(name: str, lora_dir: Path | None) -> Path:
    """The file a prompt's NAME means: LORA_DIR/NAME.safetensors (or .pt, .ckpt), or a file below
    LORA_DIR with that stem (A1111 searches its Lora folder's subfolders too)."""
    if lora_dir is None:
        raise InputError(f"prompt: <lora:{name}> needs a LoRA folder (--lora-dir DIR; Pipeline.set_lora_dir)")
    if not (lora_dir / name).resolve().is_relative_to(lora_dir.resolve()):
        raise InputError(f"prompt: <lora:{name}>: a name in the LoRA folder, not a path out of it")
    for suffix in ("", *SUFFIXES):
        p = lora_dir / (name + suffix)
        if p.is_file() and p.suffix.lower() in SUFFIXES:
            return p
    found = sorted(p for p in lora_dir.rglob("*") if p.stem == Path(name).name and p.suffix.lower() in SUFFIXES)
    if not found:
        raise InputError(f"prompt: <lora:{name}>: no {name}{{{','.join(SUFFIXES)}}} in {lora_dir}")
    return found[0]


def parse_flag(text: str) -> tuple[str, float]:
    """FILE or FILE:WEIGHT (a colon followed by something that is not a number is part of FILE: C:\\x)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def uses_from(loras, lora_dir: Path | None = None) -> list[Use]:
    """A request's `loras`: (path or name, weight) pairs, (path, te weight, unet weight), or Use."""
    out = []
    for item in loras or ():
        if isinstance(item, Use):
            out.append(item)
            continue
        if isinstance(item, (str, Path)):
            item = (item, 1.0)
        if not isinstance(item, (tuple, list)) or not 2 <= len(item) <= 3 or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in item[1:]):
            raise InputError(f"loras: expected (file, weight) pairs, got {item!r:.60}")
        path = Path(item[0])
        if lora_dir is not None and len(path.parts) == 1:
            path = find(str(item[0]), lora_dir)  # a bare name is the LoRA folder's (the server takes only these)
        if not path.is_file():
            raise InputError(f"loras: {item[0]}: no such file")
        te = float(item[1])
        out.append(Use(path, te, float(item[2]) if len(item) == 3 else te, path.stem))
    return out


# -- files ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    layers: dict[tuple[str, str], Layer]  # (component, layer name with "_" for ".") -> its pair

    @property
    def shorthash(self) -> str:
        """A1111's `Lora hashes` value: the file's sha256, first 12 hex digits."""
        return self.sha256[:12]


def read(path: Path) -> LoraFile:
    """Parse the LoRA at PATH (any format in the module docstring); an InputError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA {path}: no such file")
    try:
        tensors, meta = _safetensors(path) if path.suffix.lower() == ".safetensors" else (_torch(path), {})
    except InputError:
        raise
    except Exception as e:  # a truncated or foreign file: the readers' own errors
        raise InputError(f"LoRA {path}: cannot read it ({type(e).__name__}: {e})") from None
    layers = _layers(path, tensors, meta)
    if not layers:
        raise InputError(f"LoRA {path}: no LoRA layers in it (expected lora_down/lora_up or lora_A/lora_B pairs)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return LoraFile(path, digest.hexdigest(), layers)


def _safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for key, t in header.items():
        if t["dtype"] not in _DTYPES:
            raise InputError(f"LoRA {path}: tensor {key} is {t['dtype']}; expected float tensors")
        a, b = t["data_offsets"]
        buf = raw[8 + n + a : 8 + n + b]
        if _DTYPES[t["dtype"]] == "bfloat16":  # the high half of a float32
            arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, _DTYPES[t["dtype"]])
        out[key] = arr.reshape(t["shape"])
    return out, meta


def _torch(path: Path) -> dict:
    from sdrt.runtime.embeddings import _torch_file

    data = _torch_file(path)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise InputError(f"LoRA {path}: expected a dict of tensors")
    return data


# key suffixes of a layer's down / up matrices, per format
_DOWN_UP = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
            (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"))


def _layers(path: Path, tensors: dict, meta: dict) -> dict[tuple[str, str], Layer]:
    for key in tensors:
        for marker, name in _REFUSED.items():
            if marker in key:
                raise InputError(f"LoRA {path}: a {name} network ({key}); sdrt applies LoRA and LoCon only")
    alphas = _metadata_alphas(path, meta)
    out = {}
    for key in tensors:
        for down_suffix, up_suffix in _DOWN_UP:
            if not key.endswith(down_suffix):
                continue
            stem = key[: -len(down_suffix)]
            up = tensors.get(stem + up_suffix)
            if up is None:
                raise InputError(f"LoRA {path}: {key} has no {stem + up_suffix}")
            where = _layer_name(stem)
            if where is None:
                break
            down = np.asarray(tensors[key], np.float32)
            r = down.shape[0]
            alpha = tensors.get(stem + ".alpha")
            alpha = float(np.asarray(alpha).reshape(-1)[0]) if alpha is not None else alphas.get(where[0], r)
            out[where] = Layer(down, np.asarray(up, np.float32), alpha / r)
            break
    return out


def _layer_name(stem: str) -> tuple[str, str] | None:
    """(component, layer with "_" for ".") from a key's stem, in any format; None: not a UNet or text
    encoder layer (e.g. a second text encoder's)."""
    stem = stem.replace(".processor.", ".")  # diffusers' attention-processor names: attn1.processor.to_q_lora
    if stem.endswith(".to_out"):
        stem += ".0"
    for prefix, component in (("lora_unet_", "unet"), ("unet.", "unet"), ("lora_te_", "text_encoder"),
                              ("text_encoder.", "text_encoder")):
        if stem.startswith(prefix):
            return component, canonical(component, stem[len(prefix):])
    return None


def canonical(component: str, layer: str) -> str:
    """A layer's name as the weight map and the LoRA files are matched on: dots as underscores, and
    the text encoder's without transformers' `text_model.` level (transformers 5 dropped it)."""
    layer = layer.replace(".", "_")
    if component == "text_encoder" and layer.startswith("text_model_"):
        layer = layer[len("text_model_"):]
    return layer


def _metadata_alphas(path: Path, meta: dict) -> dict[str, float]:
    """diffusers' `lora_adapter_metadata` (peft's LoraConfig per component): component -> alpha."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"LoRA {path}: its lora_adapter_metadata is not JSON") from None
    out = {}
    for component in COMPONENTS:
        if config.get(f"{component}.alpha_pattern") or config.get(f"{component}.rank_pattern"):
            raise InputError(f"LoRA {path}: per-layer alpha / rank patterns are not supported")
        if f"{component}.lora_alpha" in config:
            out[component] = float(config[f"{component}.lora_alpha"])
    return out


# -- merging --------------------------------------------------------------------------------------

def merged(files: list[tuple[LoraFile, float]], component: str, weight_map: dict, engine_dir: Path
           ) -> dict[str, np.ndarray]:
    """The initializers COMPONENT's sessions get for FILES at their weights: {name: base + deltas} in
    the graph's layout and dtype. One initializer at a time (base, then each delta added in FILES'
    order), so the arrays being made take one copy of the changed weights plus one layer's."""
    parts: dict[str, list] = {}  # initializer -> its (layer, weight, shape in torch's layout, transposed)
    for lora, weight in files:
        for (comp, name), layer in lora.layers.items():
            entry = weight_map["layers"].get(name)
            if comp != component or weight == 0 or entry is None:
                continue
            shape = tuple(entry["shape"][::-1] if entry["transposed"] else entry["shape"])
            if layer.up.shape[0] * int(np.prod(layer.down.shape[1:])) != int(np.prod(shape)):
                raise InputError(f"LoRA {lora.path}: layer {name} is {layer.up.shape[0]} x {layer.down.shape[1:]}, "
                                 f"the model's weight {shape} (a LoRA for another model?)")
            parts.setdefault(entry["name"], []).append((layer, weight, shape, entry["transposed"]))
    by_name = {e["name"]: e for e in weight_map["layers"].values()}
    out = {}
    for init, contributions in parts.items():
        e = by_name[init]
        base = np.memmap(engine_dir / e["file"], dtype=e["dtype"], mode="r", offset=e["offset"],
                         shape=tuple(e["shape"]))
        acc = np.array(base, np.float32)
        del base
        for layer, weight, shape, transposed in contributions:
            d = layer.delta().reshape(shape) * np.float32(weight)
            acc += d.T if transposed else d
        out[init] = acc if e["dtype"] == "float32" else acc.astype(e["dtype"])
    return out


def unmatched(lora: LoraFile, maps: dict[str, dict]) -> tuple[int, list[str]]:
    """LORA's layers of the components in MAPS: how many, and those their weight maps lack."""
    mine = [(c, n) for (c, n) in lora.layers if c in maps]
    return len(mine), [f"{c}:{n}" for (c, n) in mine if n not in maps[c]["layers"]]


# -- a pipeline's state -------------------------------------------------------------------------------

FILE_CACHE = 16  # parsed LoRA files a pipeline keeps (a server switching among recent sets reads none again)


class Weights:
    """The LoRA set a pipeline's sessions run with, per component, and its recent files: `changes`
    names the components a set changes, `check` refuses a set that adapts nothing, and `switch`
    makes a component's initializers for a set."""

    def __init__(self, engine_dir: Path, manifest):
        from collections import OrderedDict

        self.engine_dir, self.manifest = engine_dir, manifest
        self.keys: dict[str, tuple] = dict.fromkeys(COMPONENTS, ())  # component -> its set's key; () = base
        self.arrays: dict[str, dict[str, np.ndarray]] = {}  # component -> initializers its sessions get
        self._files: OrderedDict[tuple, LoraFile] = OrderedDict()
        self._maps: dict[str, dict] = {}

    @staticmethod
    def component_key(uses: list[Use], component: str) -> tuple:
        """What COMPONENT's weights depend on: each file (its path, and its size and time, so that a
        file rewritten in place counts as another) with a nonzero weight for COMPONENT, and that weight."""
        out = []
        for u in uses:
            weight = u.unet if component == "unet" else u.te
            if weight != 0:
                st = u.path.stat()
                out.append((u.key[0], st.st_mtime_ns, st.st_size, weight))
        return tuple(out)

    def file(self, use: Use) -> LoraFile:
        st = use.path.stat()
        key = (use.key[0], st.st_mtime_ns, st.st_size)
        if key not in self._files:
            self._files[key] = read(use.path)
            while len(self._files) > FILE_CACHE:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    def weight_map(self, component: str) -> dict:
        if component not in self._maps:
            entry = self.manifest.components[component]
            if not entry.weight_map:
                why = "its UNet is int8" if entry.precision == "int8" else (
                    "its engines are TensorRT's" if entry.backend == "tensorrt" else "it was exported before sdrt "
                    "applied LoRAs per request")
                raise InputError(f"LoRAs per request: {self.engine_dir} has no weight map for its {component} ({why}); "
                                 "re-export it as fp32 / fp16 ONNX, or fuse the LoRA at export (sdrt export --lora)")
            self._maps[component] = json.loads((self.engine_dir / entry.weight_map).read_text())
        return self._maps[component]

    def changes(self, uses: list[Use]) -> list[str]:
        """The components whose weights USES change from the ones now loaded."""
        return [c for c in COMPONENTS if self.component_key(uses, c) != self.keys[c]]

    def check(self, uses: list[Use]) -> None:
        """Read USES' files; refuse one that adapts no layer of this model."""
        files = [self.file(u) for u in uses]
        maps = {c: self.weight_map(c) for c in COMPONENTS
                if any(comp == c for f in files for comp, _ in f.layers) and self.component_key(uses, c)}
        for f in files:
            n, missing = unmatched(f, maps)
            if n and len(missing) == n:
                raise InputError(f"LoRA {f.path}: none of its {n} layers matches a layer of this model's UNet or "
                                 f"text encoder (e.g. {missing[0]}; a LoRA for another architecture?)")
            if missing:
                log.warning("LoRA %s: %d of its %d layers match no layer of this model (e.g. %s); applying the rest",
                            f.path, len(missing), n, missing[0])

    def switch(self, uses: list[Use], component: str) -> dict[str, np.ndarray]:
        """COMPONENT's initializers for USES (empty: the base weights), now recorded as loaded."""
        self.arrays.pop(component, None)  # the old set's arrays go before the new ones are made
        self.keys[component] = ()  # the base weights, until the new arrays exist (a failure leaves those)
        key = self.component_key(uses, component)
        arrays = {}
        if key:
            files = [(self.file(u), u.unet if component == "unet" else u.te) for u in uses]
            arrays = merged(files, component, self.weight_map(component), self.engine_dir)
        self.keys[component], self.arrays[component] = key, arrays
        return arrays
