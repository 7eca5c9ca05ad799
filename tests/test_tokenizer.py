"""The runtime tokenizer against transformers' CLIPTokenizer, on both file forms."""

import json

import numpy as np
import pytest

from sdrt.tokenizer import ClipTokenizer, write_builtin_files

PROMPTS = ["A painting of a flooble", "Hello,   world! it's 3.14 élan ☃", "", "x " * 100]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    write_builtin_files(d)
    return d


def test_flooble(vocab_dir):
    ids = ClipTokenizer.from_dir(vocab_dir)(["A painting of a flooble"]).ids[0]
    assert ids[:8].tolist() == [49406, 320, 3086, 539, 320, 4062, 1059, 49407]
    assert (ids[8:] == 49407).all() and len(ids) == 77


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_both_file_forms_match_transformers(vocab_dir, tmp_path, pad):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(vocab_dir, pad_token=pad)
    expected = np.array(ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
    ref.save_pretrained(tmp_path / "json")  # transformers 5 writes tokenizer.json + tokenizer_config.json
    assert (tmp_path / "json" / "tokenizer.json").is_file()
    merges_only = tmp_path / "merges"
    write_builtin_files(merges_only)
    cfg = json.loads((merges_only / "tokenizer_config.json").read_text()) | {"pad_token": pad}
    (merges_only / "tokenizer_config.json").write_text(json.dumps(cfg))
    for d in (tmp_path / "json", merges_only):
        assert not (d / "tokenizer.json").exists() or d.name == "json"
        got = ClipTokenizer.from_dir(d)(PROMPTS).ids
        np.testing.assert_array_equal(got, expected)


def test_truncation_reports_dropped_text(vocab_dir):
    tok = ClipTokenizer.from_dir(vocab_dir)
    out = tok(["word " * 80])
    assert out.ids[0, 0] == 49406 and out.ids[0, -1] == 49407
    assert out.truncated[0] == " ".join(["word"] * 5)


def test_no_tokenizer_files(tmp_path):
    from sdrt.errors import InputError

    with pytest.raises(InputError, match="no tokenizer.json"):
        ClipTokenizer.from_dir(tmp_path)
