"""`sdrt export`: a checkpoint -> an engine directory (ONNX components, tokenizer, manifest.json).

Needs the `export` extra (torch, diffusers, transformers, onnx). The stages are in
sdrt.export.build; sdrt.export.outdir makes the directory appear complete or not at all.
"""

from sdrt.export.build import BACKENDS, PRECISIONS, export, model_dims

__all__ = ["BACKENDS", "PRECISIONS", "export", "model_dims"]
