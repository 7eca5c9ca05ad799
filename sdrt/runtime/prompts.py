"""Prompts as A1111 reads them: attention weights, BREAK, and any length in 77-token chunks.

Behaviour ported from A1111's `prompt_parser.parse_prompt_attention` and `sd_hijack_clip` (read, not
copied):

- `(x)` multiplies x's weight by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies it by 1.3 (a
  weight, optionally signed, with spaces allowed around it); brackets nest and multiply; an unclosed
  bracket applies to the end of the prompt; a closing bracket without its opening one is text;
  `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters.
- `BREAK` (the word, in capitals, outside brackets) ends the current chunk.
- The prompt is tokenized fragment by fragment (no special tokens) and cut into chunks of 75
  tokens, each sent to CLIP as BOS + 75 tokens + EOS (padded with EOS; the tokenizer's own pad token,
  SD 2's "!", after the first EOS). A chunk that fills up moves the words after its last comma, if
  that comma is within COMMA_BACKTRACK tokens of the end, into the next chunk.
- Each chunk's CLIP output is multiplied token by token by its weights (emphasis "Original": then
  rescaled to the chunk's original mean; "No norm": not rescaled; "Ignore": weights parsed away but
  not applied; "None": the prompt is taken literally, brackets included). The chunks' outputs are
  concatenated: (77 * chunks, D).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sdrt.errors import InputError

CHUNK = 75  # prompt tokens per chunk (BOS and EOS make 77)
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
EMPHASIS = ("Original", "No norm", "Ignore", "None")
DEFAULT_EMPHASIS = "Original"
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ("BREAK", -1.0)  # a parsed fragment that ends the chunk (its weight marks it)

# one syntax element per match, tried in this order: escapes, a lone backslash, opening brackets, a
# weight that closes a round bracket, closing brackets, plain text, a colon that closes nothing
_ELEMENT = re.compile(r"""
    \\[()\[\]\\] | \\ | [(\[] | :\s*(?P<weight>[+-]?[.\d]+)\s*\) | [)\]] | [^\\()\[\]:]+ | :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text: str) -> list[tuple[str, float]]:
    """(fragment, weight) pairs, neighbours of equal weight merged; BREAK as ("BREAK", -1.0)."""
    out: list[list] = []
    opened = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _ELEMENT.finditer(text):
        token, weight = m.group(0), m.group("weight")
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token in opened:
            opened[token].append(len(out))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), _number(weight))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:  # text, or a bracket / weight that closes nothing
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append(list(BREAK))
                out.append([part, 1.0])
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    merged: list[list] = []
    for item in out or [["", 1.0]]:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"prompt: {text!r} is not a weight (as in (word:1.2))") from None


@dataclass
class Chunks:
    """A prompt as CLIP inputs: (n, 77) token ids and their (n, 77) weights; per chunk, the
    textual-inversion embeddings it holds as (offset after BOS, sdrt.runtime.embeddings.Embedding)."""

    ids: np.ndarray
    weights: np.ndarray
    fixes: list

    @property
    def embeddings(self) -> list:
        """Every embedding the prompt uses (in order, once each)."""
        seen = {}
        for fixes in self.fixes:
            for _, e in fixes:
                seen.setdefault(e.name, e)
        return list(seen.values())

    def __len__(self) -> int:
        return len(self.ids)


def chunks(tokenizer, text: str, emphasis: str = DEFAULT_EMPHASIS, library=None) -> Chunks:
    """TEXT cut into 77-token chunks as A1111's tokenize_line does (sdrt.tokenizer.ClipTokenizer);
    LIBRARY (sdrt.runtime.embeddings.Library): the textual-inversion names to find in it. An
    embedding's vectors take one token each (id 0 as a placeholder) and never straddle two chunks."""
    parsed = [(text, 1.0)] if emphasis == "None" else parse(text)
    tokenized = tokenizer.encode_plain([t for t, _ in parsed])
    done: list[tuple[list[int], list[float], list]] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list = []
    comma = -1

    def close() -> None:
        nonlocal ids, weights, fixes, comma
        pad = CHUNK - len(ids)
        done.append(([tokenizer.bos_id, *ids, *[tokenizer.eos_id] * pad, tokenizer.eos_id],
                     [1.0, *weights, *[1.0] * pad, 1.0], fixes))
        ids, weights, fixes, comma = [], [], [], -1

    for tokens, (fragment, weight) in zip(tokenized, parsed):
        if (fragment, weight) == BREAK:
            close()
            continue
        at = 0
        while at < len(tokens):
            token = tokens[at]
            if token == tokenizer.comma_id:
                comma = len(ids)
            elif len(ids) == CHUNK and comma != -1 and len(ids) - comma <= COMMA_BACKTRACK:
                # the words after the comma move on; an embedding among them keeps its place in the
                # closed chunk's fixes, as in A1111
                moved_ids, moved_weights = ids[comma + 1:], weights[comma + 1:]
                ids, weights = ids[: comma + 1], weights[: comma + 1]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK:
                close()
            found, length = library.find(tokens, at) if library else (None, 0)
            if found is None:
                ids.append(token)
                weights.append(weight)
                at += 1
                continue
            if len(ids) + len(found.vectors) > CHUNK:
                close()
            fixes.append((len(ids), found))
            ids += [0] * len(found.vectors)
            weights += [weight] * len(found.vectors)
            at += length
    if ids or not done:
        close()
    arr = np.array([d[0] for d in done], np.int64)
    if tokenizer.pad_id != tokenizer.eos_id:  # SD 2: the pad token after each chunk's first EOS
        for row in arr:
            row[int(np.argmax(row == tokenizer.eos_id)) + 1:] = tokenizer.pad_id
    return Chunks(arr, np.array([d[1] for d in done], np.float64), [d[2] for d in done])


def emphasize(z: np.ndarray, weights: np.ndarray, emphasis: str = DEFAULT_EMPHASIS) -> np.ndarray:
    """One chunk's CLIP output (77, D) with its weights (77,) applied as EMPHASIS says."""
    if emphasis in ("Ignore", "None") or np.all(weights == 1.0):
        return z
    out = z * weights[:, None].astype(z.dtype)
    if emphasis == "No norm":
        return out
    return out * (z.mean() / out.mean())
