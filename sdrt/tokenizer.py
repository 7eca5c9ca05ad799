"""CLIP tokenizer on the `tokenizers` library (no torch, no transformers).

Reads either form a checkpoint ships: `tokenizer.json`, or `vocab.json` + `merges.txt` (plus
`tokenizer_config.json` / `special_tokens_map.json` for the pad token and the max length). The BPE
pipeline built from vocab + merges is the one transformers' `CLIPTokenizer` builds.

The built-in models use the real CLIP vocabulary, derived from `data/bpe_simple_vocab_16e6.txt.gz`
(from the open-clip-torch wheel; license in `data/LICENSE-open_clip.txt`) the way OpenAI's
`SimpleTokenizer` derives it.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from sdrt.errors import InputError, first_line

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer regex (OpenAI CLIP simple_tokenizer.py, as transformers writes it).
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_BPE_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable-unicode table, in CLIP's vocabulary order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def builtin_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP ViT-L/14 vocabulary (49,408 tokens) and merges, from the bundled BPE file."""
    raw = resources.files("sdrt.data").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _BPE_MERGES + 1]]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_builtin_files(directory: Path, pad_token: str | None = None) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json of the real CLIP tokenizer; PAD_TOKEN:
    SD 1.x pads with the end token (the default), SD 2.x with "!"."""
    vocab, merges = builtin_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    config = {"model_max_length": 77, "bos_token": BOS, "eos_token": EOS, "pad_token": pad_token or EOS,
              "unk_token": EOS, "tokenizer_class": "CLIPTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _special_token(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised by transformers
        return value.get("content")
    return value


def _read_files(d: Path):
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (d / name).is_file():
            config.update(json.loads((d / name).read_text(encoding="utf-8")))
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return config, Tokenizer.from_file(str(d / "tokenizer.json"))
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        return config, _bpe_tokenizer(vocab, _read_merges(d / "merges.txt"))
    raise InputError(f"{d}: no tokenizer.json and no vocab.json + merges.txt")


def _bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return [tuple(line.split()) for line in lines if line and not line.startswith("#version")]


@dataclass
class Tokenized:
    ids: np.ndarray  # (N, max_length) int64
    truncated: list[str]  # text dropped from each prompt ("" where nothing was)


class ClipTokenizer:
    """Pads to `max_length` with the checkpoint's pad token and truncates like transformers."""

    def __init__(self, backend, max_length: int, pad_token: str):
        self._tok = backend
        self.max_length = max_length
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise InputError(f"tokenizer: pad token {pad_token!r} is not in the vocabulary")
        self.pad_id = pad_id
        self.bos_id, self.eos_id = backend.token_to_id(BOS), backend.token_to_id(EOS)
        self.comma_id = backend.token_to_id(",</w>")  # A1111 moves text after a comma to the next chunk

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids without BOS / EOS, untruncated (sdrt.runtime.prompts cuts the chunks)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    @classmethod
    def from_dir(cls, directory: str | Path) -> ClipTokenizer:
        d = Path(directory)
        try:
            config, backend = _read_files(d)
        except InputError:
            raise
        except Exception as e:  # json's ValueError; tokenizers raises a plain Exception for a corrupt file
            raise InputError(f"{d}: the tokenizer files are corrupt ({first_line(e)}); re-export") from None
        backend.no_padding()
        backend.no_truncation()
        max_length = int(config.get("model_max_length", 77))
        if max_length > 10_000:  # transformers' "unset" sentinel (VERY_LARGE_INTEGER)
            max_length = 77
        pad = _special_token(config.get("pad_token")) or EOS
        # transformers matches special tokens anywhere in the text, the pad token too: SD 2.x pads
        # with "!", so a "!" in a prompt becomes id 0 there; diffusers' results depend on it
        backend.add_special_tokens([pad])
        return cls(backend, max_length, pad)

    def __call__(self, prompts: list[str]) -> Tokenized:
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        dropped = []
        for i, enc in enumerate(self._tok.encode_batch(prompts)):
            tokens = enc.ids
            if len(tokens) > self.max_length:  # keep BOS + first tokens, end with EOS (transformers)
                body = tokens[1:-1]
                keep = self.max_length - 2
                dropped.append(self._tok.decode(body[keep:]).replace("</w>", " ").strip())
                tokens = [tokens[0], *body[:keep], tokens[-1]]
            else:
                dropped.append("")
            ids[i, : len(tokens)] = tokens
        return Tokenized(ids, dropped)
