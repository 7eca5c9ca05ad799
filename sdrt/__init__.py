"""sdrt: an optimized inference runtime for Stable Diffusion (ONNX Runtime / TensorRT, no torch)."""

__version__ = "0.1.0"

__all__ = ["Pipeline", "Result", "__version__"]


def __getattr__(name):  # lazy: `import sdrt` stays cheap and torch-free
    if name in ("Pipeline", "Result"):
        from sdrt.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdrt' has no attribute {name!r}")
