"""The runtime and the generate CLI work where importing torch (or diffusers / transformers) fails."""

import subprocess
import sys
import textwrap


def test_runtime_runs_without_torch(engines, tmp_path):
    script = textwrap.dedent(f"""
        import sys

        class Block:  # importing any of these raises ImportError, as if not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch import was not blocked")

        import sdrt
        from sdrt.cli import main

        engines = {str(engines["eps"])!r}
        with sdrt.Pipeline.load(engines) as pipe:
            result = pipe("a cat", steps=2, width=64, height=48, seed=1, sampler="euler_a")
            again = pipe("a cat", steps=2, image=result.images[0], strength=0.5, seed=2)
        assert result.pixels.shape == (1, 48, 64, 3) and again.pixels.shape == (1, 48, 64, 3)
        out = {str(tmp_path / "cat.png")!r}
        assert main(["-q", "generate", "a cat", "--engines", engines, "-o", out, "--steps", "2",
                     "--width", "64", "--height", "48"]) == 0
        assert main(["info", engines]) == 0
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers")]
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
    assert (tmp_path / "cat.png").is_file()
