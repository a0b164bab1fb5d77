"""Build the decode engine from an artifact folder or a float MODEL, on the requested device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mpq.artifact import is_artifact
from mpq.errors import MpqError
from mpq.runtime.model import ModelArgs, Transformer, WeightSource


@dataclass
class Engine:
    model: Transformer
    tokenizer: object
    config: dict  # the HF config dict (eos ids live here too)
    kind: str  # "artifact" | "float"
    bits_per_weight: float  # over the quantized linears; 16 for a float model


def resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise MpqError(f"unknown device '{device}' (auto | cpu | cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise MpqError("--device cuda requested but no CUDA GPU is available")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def engine_dtype(device: torch.device) -> torch.dtype:
    """fp16 on the GPU (what the kernels take); fp32 on the CPU, where the engine is the reference."""
    return torch.float16 if device.type == "cuda" else torch.float32


def build_model(config: dict, source: WeightSource) -> Transformer:
    """The engine; on CUDA its small ops are compiled (once per process: the first decode warm-up compiles)."""
    model = Transformer(ModelArgs.from_hf_config(config), source).eval()
    if source.device.type == "cuda":
        model.compile_small_ops()
    return model


def load_engine(spec: str, device: str = "auto") -> Engine:
    from mpq.models import ModelSource, load_tokenizer, resolve_model

    dev = resolve_device(device)
    dtype = engine_dtype(dev)
    if is_artifact(spec):
        from mpq.artifact import load_artifact

        art = load_artifact(Path(spec).expanduser())
        model = build_model(art.config, WeightSource(art.floats, art.linears, device=dev, dtype=dtype))
        tokenizer = load_tokenizer(ModelSource(spec, str(art.path)))
        return Engine(model, tokenizer, art.config, "artifact", art.bits_per_weight)
    from mpq.models import load_float_model

    src = resolve_model(spec)
    hf = load_float_model(src, torch.float32)
    config = hf.config.to_dict()
    model = build_model(config, WeightSource(hf.state_dict(), device=dev, dtype=dtype))
    del hf
    return Engine(model, load_tokenizer(src), config, "float", 16.0)
