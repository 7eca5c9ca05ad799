"""Textual-inversion embeddings (A1111's and diffusers' files), read without torch.

An embedding is a name and one or more vectors of the text encoder's width. A prompt that contains
the name (as A1111 matches it: the name's tokens in the prompt's tokens) gets the vectors in place of
those tokens (sdrt.runtime.prompts), and the text encoder runs from token embeddings instead of ids
(the export's `embeds` graph), so no re-export is needed for a new word.

Files: `.safetensors` (A1111: `emb_params`; diffusers: `{token: vectors}`), `.pt` / `.bin` (torch's
zip format, A1111: `string_to_param: {"*": vectors}`; diffusers: `{token: vectors}`). torch's files
are pickles: they are read with an unpickler that builds only tensors, dicts and plain values, and
refuses anything else (a pickle can run code; this one cannot).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.errors import InputError

SUFFIXES = (".safetensors", ".pt", ".bin")
_TORCH_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                 "BFloat16Storage": "bfloat16"}


@dataclass(frozen=True)
class Embedding:
    name: str  # the word a prompt uses (A1111: the file's stem)
    vectors: np.ndarray  # (n, D) float32
    shorthash: str  # A1111's: the file's sha256, first 12 hex digits ("TI hashes" in PNG parameters)


def load(path: str | Path, name: str | None = None) -> Embedding:
    """The embedding in PATH; NAME defaults to the file's stem, as A1111 names them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"embedding {path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"embedding {path}: expected {', '.join(SUFFIXES)}")
    try:
        data = _safetensors(path) if path.suffix.lower() == ".safetensors" else _torch_file(path)
    except InputError:
        raise
    except Exception as e:  # a truncated or foreign file: the readers' own errors
        raise InputError(f"embedding {path}: cannot read it ({type(e).__name__}: {e})") from None
    vectors = _vectors(path, data)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Embedding(name or path.stem, vectors, digest[:12])


def load_dir(directory: str | Path) -> list[Embedding]:
    """Every embedding file under DIRECTORY (A1111's embeddings folder), each named by its stem."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"--embeddings-dir {d}: not a directory")
    return [load(p) for p in sorted(d.rglob("*")) if p.suffix.lower() in SUFFIXES]


def _vectors(path: Path, data) -> np.ndarray:
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # A1111 .pt
        data = data["string_to_param"]
    if isinstance(data, dict) and "emb_params" in data:  # A1111 .safetensors
        data = {"emb_params": data["emb_params"]}
    arrays = [v for v in (data.values() if isinstance(data, dict) else ()) if isinstance(v, np.ndarray)]
    if len(arrays) != 1:
        raise InputError(f"embedding {path}: expected one tensor (string_to_param, emb_params or "
                         f"{{token: tensor}}), found {len(arrays)}")
    v = arrays[0].astype(np.float32)
    v = v[None] if v.ndim == 1 else v
    if v.ndim != 2 or not 0 < len(v) <= 75 or not np.all(np.isfinite(v)):
        raise InputError(f"embedding {path}: vectors of shape {arrays[0].shape}, expected (n, width) with n "
                         "from 1 to 75 (one prompt chunk), finite")
    return v


def _safetensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


class _Unpickler(pickle.Unpickler):
    """torch.save's pickle, rebuilt as NumPy arrays; any other class is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            return _rebuild_tensor if name == "_rebuild_tensor_v2" else _rebuild_parameter
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor or a plain value (refused)")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        if dtype == "bfloat16":  # NumPy has none: the high half of a float32
            return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, dtype)


def _rebuild_tensor(storage, offset, size, stride, *_):
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride)).copy()


def _rebuild_parameter(data, *_):
    return data


def _torch_file(path: Path):
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise InputError(f"embedding {path}: not in torch's zip format (a legacy torch file?)")
        with archive.open(pkl) as f:
            return _Unpickler(f, archive, pkl.rsplit("/", 1)[0]).load()


class Library:
    """Embeddings by name, as a prompt refers to them; find() matches them in a prompt's tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # first token of a name -> (the name's tokens, its embedding), longest name first
        self.by_first: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}

    def add(self, e: Embedding) -> None:
        ids = tuple(self.tokenizer.encode_plain([e.name])[0])
        if not ids:
            raise InputError(f"embedding {e.name!r}: its name has no tokens")
        entries = [x for x in self.by_first.get(ids[0], []) if x[1].name != e.name] + [(ids, e)]
        self.by_first[ids[0]] = sorted(entries, key=lambda x: -len(x[0]))  # longest name first, as A1111

    def find(self, tokens: list[int], at: int) -> tuple[Embedding | None, int]:
        """The embedding whose name's tokens start at AT, and how many tokens the name takes."""
        for ids, e in self.by_first.get(tokens[at], ()):
            if tuple(tokens[at : at + len(ids)]) == ids:
                return e, len(ids)
        return None, 0

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_first.values())
