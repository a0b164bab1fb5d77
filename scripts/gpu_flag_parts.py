"""What the live one-graph exit decoder (`mpq.specee.flag_decode`) adds to the engine's step when nothing exits
(GPU): its step without predictors as committed; with the draft's small ops launched without PDL (as before
2026-11-27's run 27); without the next token's draft, and without the exit flag on the quantized linears (timing
only: those decode what the first does only while nothing exits); beside the engine's own step, on the trace
bench's 7B-shaped engine and quantized draft. Two alternations; writes $OUT/flag-parts.json. (At b94bb5b it also
timed the draft's q/k/v and gate/up stacked, which was slower here: flag-parts-h100-2026-11-27-b94bb5b.json.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mpq.runtime.model import kernel_ops
from mpq.specee.bench import build_exit_bench
from mpq.specee.bundle import SpecEE
from mpq.specee.flag_decode import FlagExitDecoder


def main() -> None:
    bench = build_exit_bench(Path("benchmarks/results/specee-trace-smollm2.json"))
    model, prompt, L = bench.model, bench.prompt, bench.model.args.n_layers
    draft = bench.draft

    def plain_ops(dec):
        dec.draft_ops = kernel_ops(pdl=False)

    def no_draft(dec):
        dec._draft_next = lambda token: None

    def no_flag(dec):
        dec._set_exit_flags = lambda on: None

    variants = {"committed": [], "draft small ops without PDL": [plain_ops], "no draft": [no_draft],
                "no draft, no exit flag on the linears": [no_draft, no_flag]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(2):
            for name, patches in variants.items():
                dec = FlagExitDecoder(model, SpecEE(draft, bench.preds, bench.step.offline, {}), len(prompt) + 65,
                                      mode="fill", auto_fallback=False, trace=[L], branches=0)
                dec.candidates = []
                for patch in patches:
                    patch(dec)
                dec.generate(prompt, 4)  # captures the step
                _, st, _ = dec.generate(prompt, 64)
                times[name].append(st.decode_ms / max(st.tokens, 1))
                print(f"{name:40s} {times[name][-1]:.4f}", flush=True)
                del dec
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "flag-parts.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""), "torch": torch.__version__,
        "what": "the one-graph exit decoder without predictors or exits, 7B shape (random weights, the trace bench's "
                "quantized draft), ms/token over 64 tokens after 128, parts removed (timing only), two alternations",
        "engine_ms_per_token": bench.base_ms, "rows": times}, indent=1))


if __name__ == "__main__":
    main()
