"""The CLI, the Python API and the server take the same arguments, with the same defaults and limits,
all from the one declaration (sdrt.runtime.request.GenerateRequest)."""

from __future__ import annotations

import dataclasses
import json

import pytest

import sdrt
from sdrt import serve
from sdrt.cli import build_parser, main
from sdrt.errors import InputError
from sdrt.runtime.request import GenerateRequest

FIELDS = GenerateRequest.fields(python_only=False)


def _generate_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["generate"]


def test_cli_flags_are_the_declaration():
    actions = {a.dest: a for a in _generate_parser()._actions}
    for f in FIELDS:
        a = actions[f.name]
        assert f.metadata["help"] in a.help, f.name
        if f.name == "prompt":
            assert a.nargs == "?" and not a.option_strings  # the one positional argument (--from-png: optional)
            continue
        assert a.default == f.default, f.name
        assert a.option_strings == [f.metadata["cli"] or "--" + f.name.replace("_", "-")]
    python_only = {f.name for f in GenerateRequest.fields()} - {f.name for f in FIELDS}
    assert python_only == {"latents"} and not python_only & set(actions)


def test_server_fields_are_the_declaration():
    assert list(serve.request_fields()) == [f.name for f in FIELDS]
    with pytest.raises(InputError, match="unknown field.*latents"):
        serve.parse_request(json.dumps({"prompt": "x", "latents": [0]}).encode(), max_images=4)


def test_python_defaults_are_the_declaration(engines):
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        plan = pipe.plan(GenerateRequest.make(prompt="x"))
    assert plan.req == GenerateRequest(prompt="x")
    for f in FIELDS:
        assert getattr(plan.req, f.name) == f.default or f.name == "prompt"


# one value past each limit, and the message all three paths give for it
OUT_OF_RANGE = {
    "steps": (501, "steps: 501 is out of range (1 to 500)"),
    "num_images": (9, "num_images: 9 is out of range (1 to 8)"),
    "guidance_scale": (101.0, "guidance_scale: 101.0 is out of range (0 to 100)"),
    "source_guidance_scale": (101.0, "source_guidance_scale: 101.0 is out of range (0 to 100)"),
    "strength": (1.5, "strength: 1.5 is out of range (0 to 1)"),
    "eta": (1.5, "eta: 1.5 is out of range (0 to 1)"),
    "seed": (-2, "seed: -2 is out of range"),
    "width": (2056, "width 2056: must be a multiple of 8 (the VAE scale factor) from 8 to 2048"),
    "height": (100, "height 100: must be a multiple of 8"),
    "clip_skip": (5, "clip_skip 5: this text encoder has 4 layers"),
    "cache_interval": (0, "cache_interval: 0 is out of range (1 to 500)"),
}


def test_every_limit_is_checked():
    """Each field with a limit has a case here (the declaration grows, the test follows)."""
    limited = {f.name for f in FIELDS if f.metadata["lo"] is not None or f.metadata["hi"] is not None}
    assert limited - {"prompt", "negative_prompt", "source_prompt"} <= set(OUT_OF_RANGE)


@pytest.mark.parametrize("name", OUT_OF_RANGE)
def test_the_same_limits_everywhere(engines, tmp_path, capsys, name):
    value, message = OUT_OF_RANGE[name]
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        with pytest.raises(InputError) as python:
            pipe("x", **{name: value})
        body = json.dumps({"prompt": "x", name: value}).encode()
        with pytest.raises(InputError) as server:
            pipe.plan(serve.parse_request(body, max_images=8))
    field = next(f for f in FIELDS if f.name == name)
    flag = field.metadata["cli"] or "--" + name.replace("_", "-")
    assert main(["generate", "x", "--engines", str(engines["eps"]), "-o", str(tmp_path / "o.png"),
                 flag, str(value)]) == 2
    cli = capsys.readouterr().err
    assert message in str(python.value) and message in str(server.value) and message in cli


def test_prompt_length_is_bounded():
    long = "a" * (dataclasses.fields(GenerateRequest)[0].metadata["hi"] + 1)
    with pytest.raises(InputError, match="prompt: 20001 characters is out of range"):
        GenerateRequest.make(prompt=long)


@pytest.mark.parametrize("value,message", [
    (True, "steps: expected an integer, got True"),
    ("20", "steps: expected an integer, got '20'"),
    (2.5, "steps: expected an integer, got 2.5"),
])
def test_types_are_checked(value, message):
    with pytest.raises(InputError, match=message):
        GenerateRequest.make(prompt="x", steps=value)


def test_seed_minus_one_is_random(engines):
    with sdrt.Pipeline.load(engines["eps"]) as pipe:
        a = pipe.plan(GenerateRequest.make(prompt="x", seed=-1)).seeds[0]
        b = pipe.plan(GenerateRequest.make(prompt="x", seed=-1)).seeds[0]
    assert a >= 0 and b >= 0 and a != b
