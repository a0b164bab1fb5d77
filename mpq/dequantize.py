"""The dequantizing reference path: an artifact as a plain transformers model with float weights.

`artifact_to_hf_model` is what `mpq eval` runs for artifacts on any device (so its numbers do not depend on
the Triton kernels), and `dequantize_artifact` writes the same weights as an ordinary HF checkpoint, so any
tool that reads transformers checkpoints can inspect exactly what the artifact computes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mpq.artifact import Artifact, atomic_folder, load_artifact
from mpq.errors import ArtifactError, MpqError


def float_config(art: Artifact):
    """The artifact's HF config without `quantization_config` (the model it describes is a float one)."""
    from transformers import AutoConfig

    from mpq.models import check_architecture

    cfg = {k: v for k, v in art.config.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ArtifactError("config.json has no model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"config.json is not a valid '{model_type}' config: {str(e).splitlines()[0][:200]}") from None
    check_architecture(config)
    return config


def _empty_init():
    """Parameters on the meta device (no random init of weights that are replaced anyway); buffers stay real."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # slower but equivalent
        return contextlib.nullcontext()
    return init_empty_weights(include_buffers=False)


def artifact_state_dict(art: Artifact, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF parameter names -> float tensors: stored floats as they are, linears via PackedLinear.dequantize()."""
    sd = {name: t.to(dtype) for name, t in art.floats.items()}
    for fqn, packed in art.linears.items():
        sd[f"{fqn}.weight"] = packed.dequantize(torch.float32).to(dtype)
        if packed.bias is not None:
            sd[f"{fqn}.bias"] = packed.bias.to(dtype)
    return sd


def artifact_to_hf_model(art: Artifact, dtype: torch.dtype = torch.float32):
    """A transformers CausalLM on the CPU whose weights are the artifact's (dequantized), in `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM

    config = float_config(art)
    with _empty_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = artifact_state_dict(art, dtype)
    expected = set(model.state_dict())
    unknown = sorted(set(sd) - expected)
    if unknown:
        raise ArtifactError(f"artifact tensors the '{config.model_type}' model does not have: {unknown[:3]}")
    missing = expected - set(sd)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        missing -= {"lm_head.weight"}
    if missing:
        raise ArtifactError(f"artifact lacks tensors: {sorted(missing)[:3]}")
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.tie_weights()
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if leftover:
        raise ArtifactError(f"no weights for {leftover[:3]}")
    return model.eval()


def dequantize_artifact(art_path: Path, out_dir: Path, overwrite: bool = False, dtype: torch.dtype = torch.float16) -> Path:
    """Write ART as a plain HF checkpoint (safetensors, config without quantization_config, tokenizer), atomically.

    fp16 by default: the stored floats already are fp16, and the rounding of dequantized weights to fp16 is far
    below the quantization error; pass float32 for a bit-exact copy of the reference path.
    """
    art_path, out_dir = Path(art_path), Path(out_dir)
    if out_dir.resolve() == art_path.resolve():
        raise MpqError("--out must differ from the artifact folder")
    if out_dir.exists() and not overwrite:  # fail before the (slow) load
        raise MpqError(f"output folder exists: {out_dir} (pass --overwrite to replace it)")
    art = load_artifact(art_path)
    model = artifact_to_hf_model(art, dtype)
    tokenizer = _artifact_tokenizer(art_path)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with atomic_folder(out_dir, overwrite) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def _artifact_tokenizer(path: Path):
    """The tokenizer saved in the artifact, or None when it has none (then none is written)."""
    if not any(path.glob("tokenizer*")):
        return None
    from mpq.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(str(path)))
