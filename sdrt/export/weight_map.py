"""The weight map of a component: for each Linear and Conv2d layer of the PyTorch module, the ONNX
initializer that holds its weight, so that LoRAs can change it at run time (sdrt.runtime.lora).

The exporter names few weights after their layers (a Linear's weight becomes a transposed constant
such as `val_58`), so layers are matched by value: every initializer's bytes are hashed, then each
layer's weight, as is and transposed, in the graph's dtype. A value held by several layers (equal
weights, which the exporter stores once) can't be changed for one of them: those layers are left
out of the map, so a LoRA that adapts them is refused at run time. Only weights in the external
weights file are mapped (the runtime reads the base values from there).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from sdrt.runtime.lora import canonical

log = logging.getLogger(__name__)

WEIGHT_MAP = "weight_map.json"
_NP = {1: np.float32, 10: np.float16}  # ONNX TensorProto data types of the weights LoRAs change


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _initializers(onnx_file: Path) -> dict[tuple, list[dict]]:
    """(dtype, shape, digest) -> the external initializers of ONNX_FILE with those bytes."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    out: dict[tuple, list[dict]] = {}
    maps: dict[str, np.memmap] = {}
    for t in model.graph.initializer:
        if t.data_type not in _NP or t.data_location != onnx.TensorProto.EXTERNAL or len(t.dims) not in (2, 4):
            continue
        ext = {e.key: e.value for e in t.external_data}
        data_file = onnx_file.parent / ext["location"]
        raw = maps.setdefault(ext["location"], np.memmap(data_file, np.uint8, mode="r"))
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
        dtype = np.dtype(_NP[t.data_type]).name
        key = (dtype, tuple(t.dims), _digest(raw[offset : offset + length].tobytes()))
        out.setdefault(key, []).append({"name": t.name, "shape": list(t.dims), "dtype": dtype,
                                        "file": str(Path(onnx_file.parent.name) / ext["location"]),
                                        "offset": offset})
    return out


def build(component: str, module, onnx_file: Path) -> dict:
    """COMPONENT's weight map against ONNX_FILE (fp32 weights, or fp16 ones: both are looked for)."""
    import torch

    inits = _initializers(onnx_file)
    found: dict[str, list] = {}
    for path, layer in module.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w32 = layer.weight.detach().to(torch.float32).cpu().numpy()
        for w in (w32, w32.astype(np.float16)):
            for transposed, value in ((False, w), (True, w.T if w.ndim == 2 else None)):
                if value is None:
                    continue
                value = np.ascontiguousarray(value)
                for hit in inits.get((value.dtype.name, value.shape, _digest(value.tobytes())), []):
                    found.setdefault(hit["name"], []).append((path, transposed, hit))
    by_layer: dict[str, list] = {}
    shared = 0
    for users in found.values():
        if len({p for p, _, _ in users}) > 1:
            shared += 1
            continue
        by_layer.setdefault(users[0][0], []).append(users[0])
    # a layer whose weight the graph holds twice (e.g. as is and transposed) is left out too
    layers = {canonical(component, path): {**hit, "transposed": transposed}
              for path, [(_, transposed, hit)] in ((p, u) for p, u in by_layer.items() if len(u) == 1)}
    if shared or len(layers) < len(by_layer):
        log.info("%s: %d weights held by several layers, %d layers held twice: not in the weight map", component,
                 shared, len(by_layer) - len(layers))
    return {"layers": layers}


def write(component: str, module, staging: Path, model_file: str) -> str:
    """Build and write COMPONENT's weight map beside MODEL_FILE; its path relative to STAGING."""
    path = staging / model_file
    out = path.parent / WEIGHT_MAP
    out.write_text(json.dumps(build(component, module, path), indent=1) + "\n")
    return str(out.relative_to(staging))
