"""`mpq bench e2e`: batch-1 decode of a Llama-2-7B-shaped model (random fp16 weights, std 0.02) on the GPU.

Rows: "mpq" (this engine on the data-free 2.9-bit quantization, as `mpq quantize --calib none`; its q/k/v and
gate/up GEMVs overlapped on side streams, and timed once more run one after another), "engine_fp16"
(this engine on the fp16 weights), "hf_fp16" (transformers `generate`, eager). The engine rows time the decode
steps with CUDA events around graph replays (no host syncs in between); transformers is timed on the host as
(generate N tokens - generate 1 token) / (N - 1). The floor is the bytes one decode step must read (every weight
but the embedding table) over the copy bandwidth measured in the same run (bytes read + written / time).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from mpq.errors import MpqError
from mpq.runtime.generate import Generator
from mpq.runtime.model import ModelArgs, Transformer, WeightSource, weight_bytes

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.02)
LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGET_BITS = 2.9


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * reps / (start.elapsed_time(end) / 1000)


def streamed_bytes(model: Transformer) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (one row of it), unless tied."""
    embed = model.embed.numel() * model.embed.element_size()
    tied = getattr(model.output, "weight", None) is model.embed
    return weight_bytes(model) - (0 if tied else embed)


def time_engine(model: Transformer, prompt: list[int], new_tokens: int, runs: int = 3) -> dict:
    """Capture and warm up once, then the median of `runs` timed generations."""
    gen = Generator(model, len(prompt) + new_tokens)
    gen.generate(prompt, new_tokens)
    results = [gen.generate(prompt, new_tokens) for _ in range(runs)]
    return {"ms_per_token": statistics.median(r.decode_ms_per_token for r in results),
            "prefill_ms": statistics.median(r.prefill_ms for r in results)}


def time_hf(model, prompt: list[int], new_tokens: int) -> dict:
    ids = torch.tensor([prompt], device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t)

    run(8)
    one, full = run(1), run(new_tokens)
    return {"ms_per_token": (full - one) / (new_tokens - 1), "prefill_ms": one}


def random_hf_model(config):
    """transformers' own init (normal, std = initializer_range; norms = 1), built on the GPU in fp16."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()


def quantized_source(state_dict: dict[str, torch.Tensor], n_layers: int, device, dtype=torch.float16,
                     target_bits: float = TARGET_BITS, recipe=None) -> WeightSource:
    """Data-free quantization of every decoder linear (the `--calib none` path, with the recipe's allocation
    options); the rest stays fp16."""
    from mpq.quant.pipeline import quantize_state_dict

    names = [f"model.layers.{i}.{s}" for i in range(n_layers) for s in LINEAR_SUFFIXES]
    packed, _ = quantize_state_dict({n: state_dict[f"{n}.weight"] for n in names}, target_bits, recipe)
    packed = {n: p.to("cpu") for n, p in packed.items()}  # so that building the engine allocates what it keeps
    floats = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[0] not in packed}
    return WeightSource(floats, packed, device=device, dtype=dtype)


def _build(config: dict, source: WeightSource) -> tuple[Transformer, float]:
    """The engine and the GPU memory its construction kept (GB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = Transformer(ModelArgs.from_hf_config(config), source).eval()
    torch.cuda.synchronize()
    return model, (torch.cuda.memory_allocated() - before) / 1e9


def stacked_sets(model: Transformer) -> dict[str, str]:
    """How many layers run each shared-input set as one GEMV launch (the allocation decides), and how many of those
    as a ragged stack (parts that differ in n4)."""
    from mpq.runtime.quant_linear import RaggedQuantLinear, StackedQuantLinear

    n = len(model.layers)

    def count(modules) -> str:
        modules = list(modules)
        one = sum(isinstance(m, StackedQuantLinear) for m in modules)
        ragged = sum(isinstance(m, RaggedQuantLinear) for m in modules)
        return f"{one} of {n}" + (f" ({ragged} ragged)" if ragged else "")

    return {"k/v/q": count(b.kvq for b in model.layers),
            "k/v": count(b.kvq.leading(2) for b in model.layers if hasattr(b.kvq, "leading")),
            "gate/up": count(b.gate_up for b in model.layers)}


def bench_e2e(json_out: Path | None = None, prompt_tokens: int = 128, new_tokens: int = 256, recipe=None) -> dict:
    if not torch.cuda.is_available():
        raise MpqError("mpq bench e2e needs a CUDA GPU")
    from transformers import LlamaConfig

    from mpq.versions import environment

    config = LlamaConfig(**LLAMA2_7B)
    cfg = config.to_dict()
    dev = torch.device("cuda")
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    bandwidth = copy_bandwidth()
    hf = random_hf_model(config)
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    rows = []

    started = time.time()
    qsource = quantized_source(sd, config.num_hidden_layers, dev, recipe=recipe)
    quantize_s = time.time() - started
    bits = 8 * sum(p.stored_bytes() for p in qsource.packed.values()) / sum(
        p.in_features * p.out_features for p in qsource.packed.values())
    for impl, source in (("mpq", qsource), ("engine_fp16", WeightSource(sd, device=dev, dtype=torch.float16))):
        model, mem = _build(cfg, source)
        del source
        eager = time_engine(model, prompt, new_tokens)  # small ops as plain PyTorch ops, for the notes
        model.compile_small_ops()
        extra = {}
        if impl == "mpq":  # the same engine with q/k/v and gate/up run one after another instead of overlapped
            extra["stacked_sets"] = stacked_sets(model)
            model.parallel_linears(False)
            extra["ms_per_token_serial_linears"] = time_engine(model, prompt, new_tokens)["ms_per_token"]
            model.parallel_linears(True)
            model.sum_in_place = False  # `mpq run --deterministic`: each split-K GEMV sums its shares itself
            extra["ms_per_token_deterministic"] = time_engine(model, prompt, new_tokens)["ms_per_token"]
            model.sum_in_place = True
        rows.append({"impl": impl, **time_engine(model, prompt, new_tokens), "weight_gb": weight_bytes(model) / 1e9,
                     "allocated_gb": mem, "floor_ms_per_token": streamed_bytes(model) / bandwidth * 1000,
                     "ms_per_token_uncompiled_small_ops": eager["ms_per_token"], **extra})
        del model
        torch.cuda.empty_cache()
    del qsource

    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    rows.append({"impl": "hf_fp16", **time_hf(hf, prompt, new_tokens), "weight_gb": hf_bytes / 1e9})
    for r in rows:
        r["tokens_per_s"] = 1000 / r["ms_per_token"]
    by = {r["impl"]: r for r in rows}
    floor = by["mpq"]["floor_ms_per_token"]
    result = {
        **environment(),
        "model": "Llama-2-7B shape, random fp16 weights (std 0.02)", "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "recipe": "default" if recipe is None else recipe.name,
        "bits_per_weight": bits, "quantize_seconds": quantize_s, "copy_tb_s": bandwidth / 1e12,
        "floor_ms_per_token": floor, "rows": rows,
        "speedup_vs_engine_fp16": by["engine_fp16"]["ms_per_token"] / by["mpq"]["ms_per_token"],
        "speedup_vs_hf_fp16": by["hf_fp16"]["ms_per_token"] / by["mpq"]["ms_per_token"],
        "x_floor": by["mpq"]["ms_per_token"] / floor,
    }
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result
