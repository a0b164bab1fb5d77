#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M (GGUF from PyPI) calibrated on Shakespeare (every play
# but Hamlet), quantized to <= 3.0 bits/weight all-in, evaluated on Hamlet against the float model.
# Resumable: rerun after an interruption and finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export MPQ_DATA_DIR="$PWD/data" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
RUN=${MPQ_DEMO_DIR:-runs/demo}
mkdir -p "$RUN"
start=$(date +%s)
mpq calibrate smollm2-135m --dataset shakespeare --samples 128 --seq-len 512 --out "$RUN/calib"
[ -f "$RUN/artifact/config.json" ] || mpq quantize smollm2-135m --calib "$RUN/calib" --recipe recipes/default.yaml --out "$RUN/artifact"
mpq eval "$RUN/artifact" --dataset shakespeare:hamlet --reference smollm2-135m --json | tail -n 1 > "$RUN/eval.json"
python - "$RUN/eval.json" "$start" <<'PY'
import json, sys, time
r = json.load(open(sys.argv[1]))
rows = [("float (GGUF Q4_1 dequantized)", 16.0, r["ref_ppl"], 1.0),
        ("mpq artifact", r["bits_per_weight"], r["ppl"], r["ppl_ratio"])]
print(f"\n{'model':32s} {'bits/w':>7s} {'Hamlet ppl':>11s} {'x float':>8s}")
for name, bits, ppl, ratio in rows:
    print(f"{name:32s} {bits:7.3f} {ppl:11.2f} {ratio:8.3f}")
print(f"KL divergence {r['kld']:.4f} nats/token, top-1 agreement {r['top1_agreement']:.3f}; "
      f"{r['tokens']} tokens; demo wall time {time.time() - float(sys.argv[2]):.0f} s")
PY
