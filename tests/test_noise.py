"""Noise sources: torch's CPU generator reproduced bit for bit, A1111's Philox source against
Random123's answers (and torch on CUDA where there is one), draw order, and the sources in the API,
the CLI and the PNG parameters. Whole images from seeds against diffusers: test_parity, test_inpaint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime import noise
from sdrt.runtime.rng import PhiloxGenerator, TorchCpuGenerator, philox4x32

SEEDS = [0, 1, 42, 2**31 + 3, 2**32 + 7, 2**63 + 5]
# under 16 values (the float64 layout, its cached second value), 16 and not a multiple of 16 (the
# redrawn last block), and latents of every rank
SHAPES = [(1,), (3,), (15,), (16,), (17,), (33,), (4, 8, 6), (1, 4, 64, 64), (2, 4, 9, 7), (5,), (1,)]


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_cpu_generator_is_torch_bit_for_bit(seed):
    """One generator, successive calls of every layout: each equals torch.randn's, bit for bit."""
    ours, theirs = TorchCpuGenerator(seed), torch.Generator("cpu").manual_seed(seed)
    for shape in SHAPES:
        want = torch.randn(shape, generator=theirs).numpy()
        got = ours.randn(shape)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (seed, shape)


def test_torch_cpu_generator_on_many_latents():
    for seed in range(20):
        want = torch.randn((1, 4, 24, 40), generator=torch.Generator().manual_seed(seed)).numpy()
        assert np.array_equal(TorchCpuGenerator(seed).randn((1, 4, 24, 40)), want), seed


def test_philox_matches_random123_answers():
    """Philox4x32-10 known answers (Random123's kat_vectors)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        got = philox4x32(np.array(counter, np.uint32)[:, None], np.array(key, np.uint32)[:, None])[:, 0]
        assert [int(v) for v in got] == list(want)


def test_a1111_nv_source_layout():
    """A1111's NV source: normals from (offset, 0, index, 0) counters keyed by the seed, the offset one
    further per call; so a call's values do not depend on the shape, only on the count."""
    g = PhiloxGenerator(1234)
    first = g.randn((1, 4, 8, 8))
    second = g.randn((1, 4, 8, 8))
    assert first.dtype == np.float32 and not np.array_equal(first, second)
    again = PhiloxGenerator(1234).randn((256,))
    assert np.array_equal(first.reshape(-1), again)
    assert np.array_equal(PhiloxGenerator(1234).randn((10,)), again[:10])
    x = PhiloxGenerator(7).randn((200_000,))
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert PhiloxGenerator(-1).seed == 2**64 - 1  # A1111 wraps negative seeds


# torch.randn((8, 8), device="cuda") after torch.manual_seed(0), as printed (4 decimals) in a published
# notebook run on an NVIDIA GPU: the first 64 values of A1111's initial noise at seed 0 with its default
# GPU source (one torch.randn per image of shape (4, h, w), flat order)
CUDA_SEED0 = [
    [-0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284],
    [-1.0745, -0.3631, -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820],
    [-0.1271, 1.2169, 1.4353, 1.0605, -0.4941, -1.4244, -0.7244, -1.2973],
    [0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373, 1.3506, -0.2879],
    [-0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435, 1.5150],
    [0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554],
    [-0.1836, 0.3824, 0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863],
    [-0.5499, -0.3231, -0.5469, 0.9049, 0.2837, 0.1210, 0.4730, -1.0823]]
# the first 12 values of a C port of A1111's rng_philox.py at seed 0, offset 0, as its test states them
# (8 decimals; the port computes Box-Muller in double, A1111 in float32)
A1111_SEED0 = [-0.92466259, -0.42534414, -2.64384580, 0.14518388, -0.12086648, -0.57972562, -0.62285119,
               -0.32838708, -1.07454228, -0.36314407, -1.67105067, 2.26550508]


def test_a1111_gpu_reproduces_stated_values():
    """Stated outputs, not only our own port: torch.randn on CUDA printed by a GPU run, and another
    port of A1111's NV source; through the noise source, as the initial noise of a 64 px generation."""
    x = noise.Noise("a1111-gpu", [0]).draw(noise.INITIAL, (1, 4, 8, 8)).reshape(-1)
    assert np.array_equal(np.round(x[:64], 4), np.array(CUDA_SEED0).reshape(-1))
    np.testing.assert_allclose(x[:12], A1111_SEED0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.randn on CUDA)")
def test_a1111_nv_source_equals_torch_on_cuda():
    for seed in (0, 42, 2**32 + 1):
        for shape in [(4, 64, 64), (1, 4, 96, 64), (3,)]:
            want = torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda").cpu().numpy()
            assert np.allclose(PhiloxGenerator(seed).randn(shape), want, atol=1e-6), (seed, shape)


def test_sources_draw_per_image_and_in_order():
    shape = (3, 4, 8, 6)
    torch_cpu = noise.Noise("torch-cpu", [5, 6, 7])
    initial, step = torch_cpu.draw(noise.INITIAL, shape), torch_cpu.draw(noise.SAMPLER, shape)
    for i, s in enumerate([5, 6, 7]):  # image i: seed 5 + i's generator, continued draw after draw
        gen = torch.Generator().manual_seed(s)
        assert np.array_equal(initial[i], torch.randn((1, 4, 8, 6), generator=gen).numpy()[0])
        assert np.array_equal(step[i], torch.randn((1, 4, 8, 6), generator=gen).numpy()[0])
    # a batch of one image gives that image whatever its place in a batch
    assert np.array_equal(noise.Noise("torch-cpu", [6]).draw(noise.INITIAL, (1, 4, 8, 6))[0], initial[1])
    shared = noise.Noise("torch-cpu", [5, 6]).draw(noise.POSTERIOR, (2, 4, 8, 6), shared=True)
    assert np.array_equal(shared[0], shared[1]) and np.array_equal(shared[0], initial[0])
    # sdrt: every use its own stream, independent of order
    a, b = noise.Noise("sdrt", [5]), noise.Noise("sdrt", [5])
    a.draw(noise.POSTERIOR, (1, 4, 8, 6))
    assert np.array_equal(a.draw(noise.INITIAL, (1, 4, 8, 6)), b.draw(noise.INITIAL, (1, 4, 8, 6)))
    # A1111: the image's generator for the initial and the steps' noise only
    nv = noise.Noise("a1111-gpu", [5])
    nv.draw(noise.POSTERIOR, (1, 4, 8, 6))
    assert np.array_equal(nv.draw(noise.INITIAL, (1, 4, 8, 6)), PhiloxGenerator(5).randn((1, 4, 8, 6)))
    with pytest.raises(ValueError, match="unknown noise source 'nope'"):
        noise.Noise("nope", [1])


def test_rng_field_names_and_reads_back():
    assert [noise.source_from_rng_field(noise.RNG_FIELD[s]) for s in noise.SOURCES] == list(noise.SOURCES)
    assert noise.source_from_rng_field(None) == noise.source_from_rng_field("GPU") == "a1111-gpu"
    with pytest.raises(ValueError, match="unknown RNG"):
        noise.source_from_rng_field("quantum")


@pytest.fixture(scope="module")
def pipe(engines):
    import sdrt

    with sdrt.Pipeline.load(engines["eps"]) as p:
        yield p


def test_sources_through_the_pipeline(pipe):
    """torch-cpu is the default; a1111-cpu draws txt2img's noise as torch-cpu does; every image
    records its source in A1111's RNG field; an unknown source is refused."""
    from sdrt.errors import InputError
    from sdrt.runtime.images import parse_a1111_parameters

    args = dict(prompt="a dog", steps=3, width=64, height=48, sampler="euler_a", seed=3)
    default = pipe(**args)
    torch_cpu = pipe(**args, noise="torch-cpu")
    assert np.array_equal(default.pixels, torch_cpu.pixels)
    assert np.array_equal(pipe(**args, noise="a1111-cpu").pixels, torch_cpu.pixels)
    other = {s: pipe(**args, noise=s) for s in ("sdrt", "a1111-gpu")}
    assert all(np.abs(r.pixels - torch_cpu.pixels).max() > 0.01 for r in other.values())
    assert parse_a1111_parameters(default.parameters[0])["RNG"] == "torch-cpu"
    assert parse_a1111_parameters(other["a1111-gpu"].parameters[0])["RNG"] == "NV"
    with pytest.raises(InputError, match="noise"):
        pipe(**args, noise="nope")


def test_cli_noise_flag(engines, tmp_path, capsys):
    from sdrt.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "a dog", "--engines", str(engines["eps"]), "--steps", "2", "--width", "64",
                 "--height", "48", "--noise", "a1111-gpu", "-o", str(out)]) == 0
    from PIL import Image

    assert "RNG: NV" in Image.open(out).text["parameters"]
    capsys.readouterr()
    assert main(["generate", "a dog", "--engines", str(engines["eps"]), "--noise", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "noise" in err[0] and "torch-cpu" in err[0]
