"""Where one decode step's time goes (GPU): a Llama-2-7B-shaped engine on random format-v1 layers (no quantizer
run, so it starts in seconds), graph-replayed step time, then device time per kernel family from torch.profiler
over eager steps. Prints a table; writes $OUT/e2e-profile.json (or benchmarks/results/)."""

from __future__ import annotations

import json
import os
import sys
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kernels import dispatch
from mpq.bench.e2e import LINEAR_SUFFIXES, LLAMA2_7B
from mpq.bench.kernels import random_layer
from mpq.runtime.generate import Generator
from mpq.runtime.model import ModelArgs, Transformer, WeightSource

FAMILIES = (("_gemv_kernel", "mpq GEMV"), ("_gemv_h2", "mpq GEMV"), ("_gemm_kernel", "mpq GEMM"), ("_dequant_kernel", "mpq dequant"),
            ("_decode_attention", "fused decode attention"), ("_add_rms_norm", "step ops (kernels/step_ops.py)"),
            ("_silu_mul", "step ops (kernels/step_ops.py)"), ("fmha", "SDPA"),
            ("attention", "SDPA"), ("triton_", "inductor (small ops)"), ("gemv", "cuBLAS GEMV"), ("gemm", "cuBLAS"),
            ("index", "index/copy"), ("copy", "index/copy"), ("elementwise", "eager elementwise"), ("reduce", "eager reduce"))


def random_engine(quantized: bool, stack: bool = True) -> Transformer:
    a = LLAMA2_7B
    d, f, v, n = a["hidden_size"], a["intermediate_size"], a["vocab_size"], a["num_hidden_layers"]
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d), "self_attn.o_proj": (d, d),
              "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16) * 0.02  # noqa: E731
    floats = {"model.embed_tokens.weight": rnd(v, d), "lm_head.weight": rnd(v, d), "model.norm.weight": torch.ones(d, device="cuda")}
    packed = {}
    for i in range(n):
        floats[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(d, device="cuda")
        floats[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(d, device="cuda")
        for s in LINEAR_SUFFIXES:
            name = f"model.layers.{i}.{s}"
            if quantized:
                packed[name] = random_layer(*shapes[s], 1, "cuda", seed=i)
            else:
                floats[f"{name}.weight"] = rnd(*shapes[s])
    cfg = dict(LLAMA2_7B, model_type="llama")
    return Transformer(ModelArgs.from_hf_config(cfg), WeightSource(floats, packed, device=torch.device("cuda"), dtype=torch.float16, stack=stack))


def family(name: str) -> str:
    low = name.lower()
    return next((label for key, label in FAMILIES if key in low), "other")


def profile_engine(quantized: bool, stack: bool = True, pdl: bool = True, fused_attention: bool = True) -> dict:
    dispatch.PDL = pdl  # read when the small ops compile and when each GEMV launches (so at capture)
    torch._dynamo.reset()
    model = random_engine(quantized, stack)
    model.compile_small_ops()
    if not fused_attention:
        model.ops.decode_attention = None  # RoPE + cache write, then SDPA over the whole cache
    prompt = list(range(1, 129))
    gen = Generator(model, 384)
    gen.generate(prompt, 256)
    step_ms = statistics.median(gen.generate(prompt, 256).decode_ms_per_token for _ in range(3))
    eager = Generator(model, 384, use_graph=False)
    eager.generate(prompt, 4)
    eager.generate(prompt, 2)  # prefill; leaves the step buffers at position 129
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager.decode_n_tokens(10)
        torch.cuda.synchronize()
    per_family, launches = defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
            per_family[family(e.key)] += e.self_device_time_total / 1000 / 10  # ms per decode step
            launches[family(e.key)] += e.count // 10
    top = sorted(((e.key[:60], e.self_device_time_total / 1000 / 10, e.count // 10) for e in prof.key_averages()
                  if e.device_type.name == "CUDA"), key=lambda r: -r[1])[:15]
    del model, gen, eager
    torch.cuda.empty_cache()
    return {"graph_ms_per_token": step_ms, "kernel_ms_per_step": dict(per_family), "launches_per_step": dict(launches),
            "top_kernels": top}


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    result = {"device": torch.cuda.get_device_name()}
    if "--quick" in sys.argv:  # the default configuration only
        r = profile_engine(True)
        print(f"graph replay {r['graph_ms_per_token']:.3f} ms/token")
        return
    # the fused decode attention and programmatic dependent launch (the defaults on sm_90+) against SDPA and
    # plain stream order, alternated twice on one card
    for rep in ("", "_2"):
        result["mpq_random_layers" + rep] = profile_engine(True)
        result["mpq_random_layers_sdpa" + rep] = profile_engine(True, fused_attention=False)
        result["mpq_random_layers_sdpa_no_pdl" + rep] = profile_engine(True, pdl=False, fused_attention=False)
    result["fp16"] = profile_engine(False)
    result["fp16_sdpa"] = profile_engine(False, fused_attention=False)
    result["fp16_sdpa_no_pdl"] = profile_engine(False, pdl=False, fused_attention=False)
    for name, r in result.items():
        if name == "device":
            continue
        total = sum(r["kernel_ms_per_step"].values())
        print(f"\n{name}: graph replay {r['graph_ms_per_token']:.3f} ms/token; kernel time per eager step {total:.3f} ms")
        for fam, ms in sorted(r["kernel_ms_per_step"].items(), key=lambda kv: -kv[1]):
            print(f"  {fam:24s} {ms:7.3f} ms  {r['launches_per_step'][fam]:5d} launches")
        for key, ms, count in r["top_kernels"]:
            print(f"    {ms:7.3f} ms {count:5d}x  {key}")
    (out / "e2e-profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
