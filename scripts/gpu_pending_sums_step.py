"""The decode step with and without pending sums (GPU): `Transformer.sum_in_place` on, the split-K GEMVs add their
shares into fp32 sums that the next small op reads and zeroes; off, each GEMV hands its shares' partials over to
its last share (the fenceless split-K epilogue). The random-layer 7B engine (`gpu_e2e_profile.random_engine`,
small ops compiled), graph-replayed decode (median of 3 x 256 tokens after 128), alternated twice; the greedy
tokens of both compared, and how many linear calls of a captured step added in place. Writes
$OUT/pending-sums-step.json."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from gpu_engine_table import alternate  # noqa: E402
from mpq.runtime.generate import Generator  # noqa: E402
from mpq.runtime.quant_linear import QuantLinear  # noqa: E402


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    model = random_engine(True)
    model.compile_small_ops()
    added = []
    add_into = QuantLinear.add_into
    QuantLinear.add_into = lambda self, x, acc: added.append(add_into(self, x, acc)) or added[-1]
    tokens = {}
    for on in (False, True):
        model.sum_in_place = on
        added.clear()
        tokens[on] = Generator(model, 384).generate(list(range(1, 129)), 32).tokens
        print(f"sum_in_place={on}: {added.count(True)} in-place adds of {len(added)} offered", flush=True)
    QuantLinear.add_into = add_into
    print(f"tokens equal: {tokens[True] == tokens[False]}", flush=True)
    times = alternate(model, {"each GEMV hands its partials over": False, "pending sums": True},
                      lambda on: setattr(model, "sum_in_place", on))
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts):.4f} ms/token", flush=True)
    result = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", "unknown"),
              "torch": torch.__version__, "tokens_equal": tokens[True] == tokens[False], "ms_per_token": times}
    (out / "pending-sums-step.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
