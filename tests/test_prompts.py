"""A1111's prompt syntax: the parser against A1111's documented examples and hand-derived cases, the
77-token chunks against hand-built token sequences, and whole images against diffusers handed the
embeddings A1111's algorithm makes with the PyTorch text encoder (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

import sdrt
from sdrt.errors import InputError
from sdrt.runtime import prompts
from sdrt.runtime.prompts import parse
from tests import reference
from tests.conftest import SIZES

R, S = 1.1, 1 / 1.1  # one round / square bracket
BRK = ("BREAK", -1.0)

# A1111's own examples: its wiki's attention section and parse_prompt_attention's doctests
DOCUMENTED = [
    ("a (word)", [("a ", 1.0), ("word", R)]),
    ("a ((word))", [("a ", 1.0), ("word", R * R)]),
    ("a [word]", [("a ", 1.0), ("word", S)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", R), ("on", 1.0), (" a ", R), ("hill", 0.55),
      (", sun, ", R), ("sky", 1.4641000000000006), (".", R)]),
]

# derived by hand from A1111's rules (see sdrt/runtime/prompts.py)
MORE = [
    ("", [("", 1.0)]),
    ("plain, text with, commas", [("plain, text with, commas", 1.0)]),
    ("(a)(b)", [("ab", R)]),
    ("(((a)))", [("a", R * R * R)]),
    ("[[a]]", [("a", S * S)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:x)", [("a:x", R)]),  # not a weight: the colon is text, the bracket a plain one
    ("a:1.5)", [("a:1.5)", 1.0)]),  # a weight closing nothing is text
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("[a)", [("a)", S)]),  # ")" closes nothing (text); "[" never closes: to the end
    ("(a]", [("a]", R)]),
    ("((a:1.5))", [("a", 1.5 * R)]),
    ("(a (b:2) c)", [("a ", R), ("b", 2.0 * R), (" c", R)]),
    ("\\\\", [("\\", 1.0)]),
    ("a \\ b", [("a  b", 1.0)]),  # a lone backslash is dropped
    ("(\\(a\\))", [("(a)", R)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("a BREAK b", [("a", 1.0), BRK, ("b", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),  # BREAK is a word of its own
    ("a break b", [("a break b", 1.0)]),  # in capitals
    ("(a BREAK b)", [("a", R), ("BREAK", -R), ("b", R)]),  # weighted, it is the word "BREAK" (A1111 too)
    ("BREAK", [("", 1.0), BRK, ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BRK, ("", 1.0), BRK, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), BRK, ("b", 1.0)]),
    ("x (a:1.0) y", [("x a y", 1.0)]),  # equal weights merge
    ("(a)[b]", [("a", R), ("b", S)]),
    ("[a:1.5]", [("a:1.5", S)]),  # weights are for round brackets only
    ("((a)", [("a", R * R)]),
    ("(a))", [("a", R), (")", 1.0)]),
    ("a (b", [("a ", 1.0), ("b", R)]),
    ("(a:1.5", [("a:1.5", R)]),
    ("(masterpiece:1.2), [blurry], BREAK, <lora:detail:0.6>",
     [("masterpiece", 1.2), (", ", 1.0), ("blurry", S), (",", 1.0), BRK, (", <lora:detail:0.6>", 1.0)]),
]


@pytest.mark.parametrize("text,want", DOCUMENTED + MORE, ids=[repr(t) for t, _ in DOCUMENTED + MORE])
def test_parser_equals_a1111(text, want):
    assert parse(text) == want


def test_a_malformed_weight_is_named():
    with pytest.raises(InputError, match=r"'1\.2\.3' is not a weight"):
        parse("(a:1.2.3)")


class Tok:
    """The ids sdrt's tokenizer gives, fixed here: 'cat' 2368, ',' 267, BOS 49406, EOS 49407."""

    CAT, COMMA, BOS, EOS = 2368, 267, 49406, 49407


@pytest.fixture(scope="module")
def tokenizer(engines):
    from sdrt.tokenizer import ClipTokenizer

    tok = ClipTokenizer.from_dir(engines["eps"] / "tokenizer")
    assert tok.encode_plain(["cat", ","]) == [[Tok.CAT], [Tok.COMMA]]
    return tok


def _row(body: list[int], pad: int = Tok.EOS) -> list[int]:
    return [Tok.BOS, *body, Tok.EOS] + [pad] * (75 - len(body))


C = Tok.CAT
CHUNKING = [
    ("cat " * 75, [[C] * 75]),
    ("cat " * 76, [[C] * 75, [C]]),
    ("cat " * 80, [[C] * 75, [C] * 5]),
    # a comma 5 tokens before the edge: the words after it move to the next chunk
    ("cat " * 70 + ", " + "cat " * 10, [[C] * 70 + [Tok.COMMA], [C] * 10]),
    # exactly 20 back still moves, 21 does not (COMMA_BACKTRACK)
    ("cat " * 55 + ", " + "cat " * 30, [[C] * 55 + [Tok.COMMA], [C] * 30]),
    ("cat " * 54 + ", " + "cat " * 30, [[C] * 54 + [Tok.COMMA] + [C] * 20, [C] * 10]),
    ("cat " * 75 + "BREAK cat", [[C] * 75, [C]]),  # BREAK at the edge adds no empty chunk
    ("cat BREAK", [[C]]),
    ("cat BREAK cat BREAK cat", [[C], [C], [C]]),
    ("", [[]]),
]


@pytest.mark.parametrize("text,want", CHUNKING, ids=range(len(CHUNKING)))
def test_chunks_as_a1111_cuts_them(tokenizer, text, want):
    c = prompts.chunks(tokenizer, text)
    assert c.ids.tolist() == [_row(body) for body in want]
    assert np.all(c.weights == 1.0)


def test_chunk_weights_and_sd2_padding(tokenizer, engines):
    from sdrt.tokenizer import ClipTokenizer

    c = prompts.chunks(tokenizer, "(cat:1.5) [cat] cat")
    assert c.weights[0, :5].tolist() == [1.0, 1.5, S, 1.0, 1.0]
    sd2 = ClipTokenizer.from_dir(engines["vpred"] / "tokenizer")  # pads with "!" (id 0) after the first EOS
    assert prompts.chunks(sd2, "cat BREAK cat").ids.tolist() == [_row([C], pad=0)] * 2
    assert prompts.chunks(tokenizer, "(cat) cat", "None").ids[0, 1:5].tolist() != [C, C, Tok.EOS, Tok.EOS]


@pytest.fixture(scope="module")
def biased(checkpoints, tmp_path_factory):
    """The eps checkpoint with non-zero LayerNorm biases in its text encoder (random init has zeros,
    and then a chunk's mean is about 0: A1111's mean restoration would divide 0 by 0); exported."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdrt.export import export

    root = tmp_path_factory.mktemp("biased")
    pipe = StableDiffusionPipeline.from_pretrained(checkpoints["eps"], safety_checker=None)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in pipe.text_encoder.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    pipe.save_pretrained(root / "ckpt")
    export(str(root / "ckpt"), root / "engines", progress=False, optimize=False)
    return root / "ckpt", root / "engines"


LONG = ", ".join(["a red apple on a wooden table", "(golden light:1.3)", "[dust]", "oil painting"] * 6)
CASES = [  # prompt, negative, emphasis, clip skip
    ("a (red:1.4) apple on a [[wooden]] table", "(blurry:1.2), lowres", "Original", 1),
    ("a (red:1.4) apple on a [[wooden]] table", "(blurry:1.2), lowres", "No norm", 2),
    ("a red apple BREAK on a (wooden table)", "", "Original", 1),
    (LONG, "(blurry)", "Original", 1),  # 2 chunks; the negative is padded with an empty chunk
    ("short", LONG + ", " + LONG, "Ignore", 1),  # 3 chunks; the prompt is padded
]


@pytest.mark.parametrize("prompt,negative,emphasis,clip_skip", CASES, ids=range(len(CASES)))
def test_embeddings_and_images_equal_a1111s_algorithm(biased, prompt, negative, emphasis, clip_skip):
    """sdrt's embeddings equal A1111's algorithm run with the PyTorch text encoder, and the image
    equals diffusers given those embeddings (prompt_embeds, negative_prompt_embeds)."""
    ckpt, engines = biased
    w, h = SIZES["eps"]
    with sdrt.Pipeline.load(engines) as pipe:
        ours = pipe.encode_prompts([prompt, negative], clip_skip, emphasis)
        cond, uncond = reference.a1111_embeddings(ckpt, [prompt, negative], clip_skip, emphasis)
        np.testing.assert_allclose(ours, np.stack([cond, uncond]), atol=2e-5, rtol=1e-5)
        image = pipe(prompt, negative_prompt=negative, emphasis=emphasis, clip_skip=clip_skip, steps=4, seed=3,
                     width=w, height=h, sampler="euler_a").pixels
    want = reference.txt2img_embeds(ckpt, cond, uncond, steps=4, sampler="euler_a", guidance_scale=7.5,
                                    width=w, height=h, seeds=[3])
    assert np.abs(image - want).max() < 2e-3


def test_emphasis_changes_the_image_and_is_recorded(biased):
    _, engines = biased
    w, h = SIZES["eps"]
    with sdrt.Pipeline.load(engines) as pipe:
        args = dict(steps=2, seed=1, width=w, height=h)
        plain = pipe("a red apple", **args)
        weighted = pipe("a (red:1.5) apple", **args)
        ignored = pipe("a (red:1.5) apple", emphasis="Ignore", **args)
        assert np.abs(plain.pixels - weighted.pixels).max() > 1e-3
        assert np.array_equal(plain.pixels, ignored.pixels)  # parsed away, not applied
        assert "Emphasis: Ignore" in ignored.parameters[0] and "Emphasis" not in weighted.parameters[0]
        with pytest.raises(InputError, match="emphasis 'loud': choose one of Original, No norm, Ignore, None"):
            pipe("x", emphasis="loud", **args)


def test_from_png_reproduces_the_image(engines, tmp_path, capsys):
    """`sdrt generate --from-png` reads prompt, settings, seed and noise source back from an image's
    parameters and makes the same image; flags given with it override the PNG's."""
    from PIL import Image

    from sdrt.cli import main

    first, again, other = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "other.png"
    engine = ["--engines", str(engines["eps"]), "-q"]
    assert main(["generate", "a (red:1.3) apple BREAK on a [table]", *engine, "--negative-prompt", "(blurry)",
                 "--steps", "3", "--sampler", "DPM++ 2M", "--schedule-type", "karras", "--guidance-scale", "6",
                 "--seed", "77", "--width", "64", "--height", "48", "--clip-skip", "2", "--noise", "a1111-cpu",
                 "--emphasis", "No norm", "-o", str(first)]) == 0
    assert main(["generate", "--from-png", str(first), *engine, "-o", str(again)]) == 0
    a, b = Image.open(first), Image.open(again)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.text["parameters"] == b.text["parameters"]
    assert main(["generate", "--from-png", str(first), *engine, "--seed", "78", "-o", str(other)]) == 0
    assert "Seed: 78," in Image.open(other).text["parameters"]
    assert not np.array_equal(np.asarray(a), np.asarray(Image.open(other)))
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    capsys.readouterr()
    assert main(["generate", "--from-png", str(tmp_path / "plain.png"), *engine]) == 2
    assert main(["generate", *engine]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no A1111 `parameters` text" in err[0] and "a prompt is needed" in err[1]


def _embedding_files(tmp_path, width: int):
    """An A1111 .pt (two vectors, `string_to_param`) and a diffusers .safetensors ({token: vectors})."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    style = torch.randn(2, width, generator=g) * 0.5
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(style)},
                "name": "sdrtstyle", "step": 100}, tmp_path / "sdrtstyle.pt")
    save_file({"<sdrtdog>": torch.randn(1, width, generator=g) * 0.5}, tmp_path / "sdrtdog.safetensors")
    return tmp_path / "sdrtstyle.pt", tmp_path / "sdrtdog.safetensors"


def test_textual_inversion_equals_diffusers(checkpoints, engines, tmp_path, monkeypatch):
    """Embeddings named in a prompt replace exactly their tokens' rows (no re-export: the text encoder's
    embeds graph), and the image equals diffusers with the same files loaded by load_textual_inversion."""
    w, h = SIZES["eps"]
    style, dog = _embedding_files(tmp_path, 32)
    prompt, negative = "a photo of sdrtstyle, a sdrtdog on a hill", "blurry sdrtstyle"  # diffusers: no weights
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        assert pipe.load_embeddings(tmp_path) == ["sdrtdog", "sdrtstyle"]
        plain = pipe.encode_prompt("a photo of sdrtstyle", 1)
        _, table = pipe._embeds_engine()
        seen = []
        engine = pipe.engines["text_encoder:embeds"]
        real = engine._run
        monkeypatch.setattr(engine, "_run", lambda feeds: seen.append(feeds["inputs_embeds"]) or real(feeds))
        pipe._embeddings.clear()
        result = pipe(prompt, negative_prompt=negative, steps=4, seed=3, width=w, height=h, sampler="euler_a")
    chunks = prompts.chunks(pipe.tokenizer, prompt, library=pipe.library)
    x, looked_up = seen[0][0], table[chunks.ids[0]]
    changed = np.flatnonzero(np.any(x != looked_up, axis=1)).tolist()
    (offset_style, e_style), (offset_dog, e_dog) = chunks.fixes[0]
    assert changed == [offset_style + 1, offset_style + 2, offset_dog + 1]  # after BOS: 2 rows, then 1
    assert np.array_equal(x[offset_style + 1 : offset_style + 3], e_style.vectors)
    assert plain.shape == (77, 32) and "TI hashes: \"sdrtstyle: " in result.parameters[0]
    want = reference.txt2img_with_embeddings(checkpoints["eps"], prompt=prompt, negative_prompt=negative,
                                             files={"sdrtstyle": style, "sdrtdog": dog}, steps=4, seed=3,
                                             width=w, height=h, sampler="euler_a")
    assert np.abs(result.pixels - want).max() < 2e-3


def test_embedding_files_are_checked(engines, tmp_path):
    import os

    import torch

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    torch.save({"a": torch.zeros(2, 32), "b": torch.zeros(1, 32)}, tmp_path / "two.bin")
    torch.save({"a": torch.zeros(2, 16)}, tmp_path / "narrow.bin")
    (tmp_path / "text.pt").write_text("no")
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        with pytest.raises(InputError, match="os.system|posix.system"):
            pipe.add_embedding(tmp_path / "evil.pt")
        with pytest.raises(InputError, match="expected one tensor"):
            pipe.add_embedding(tmp_path / "two.bin")
        with pytest.raises(InputError, match="cannot read it"):
            pipe.add_embedding(tmp_path / "text.pt")
        pipe.add_embedding(tmp_path / "narrow.bin")
        with pytest.raises(InputError, match="embedding 'narrow': vectors of width 16, .* takes 32"):
            pipe("a narrow dog", steps=1, width=64, height=48)


def test_server_reads_weights_breaks_and_embeddings(engines, tmp_path):
    """`sdrt serve --embeddings-dir`: the native API's image for an A1111-syntax prompt naming an
    embedding is the Python API's."""
    import base64
    import io

    from PIL import Image

    from sdrt.serve import ServeConfig
    from tests.serving import LiveServer, call

    _embedding_files(tmp_path, 32)
    w, h = SIZES["eps"]
    args = dict(prompt="a (sdrtstyle:1.2) castle BREAK [fog]", negative_prompt="sdrtdog", steps=2, seed=4, width=w,
                height=h)
    server = LiveServer(ServeConfig(engines["eps"], max_images=1, max_queue=2, embeddings_dir=tmp_path))
    try:
        status, out, _ = call(server.url, "/generate", args)
    finally:
        server.stop()
    assert status == 200, out
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        pipe.load_embeddings(tmp_path)
        want = pipe(**args)
    got = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.images[0]))
    assert out["parameters"] == want.parameters and "TI hashes" in want.parameters[0]
