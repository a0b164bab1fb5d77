"""Temporary (GPU): the one-graph exit decoder on a real artifact: argv = ARTIFACT BRANCHES TOKENS DEVICE [""] [fill|drop]; prints the branch points, mean layers, the first tokens and the text. Run with python3 -X faulthandler."""
import sys, faulthandler, time
faulthandler.enable()
from pathlib import Path
import torch
from mpq.runtime.loader import load_engine
from mpq.specee.bundle import load_specee
from mpq.specee.flag_decode import FlagExitDecoder
art = sys.argv[1]; b = int(sys.argv[2]); n = int(sys.argv[3])
eng = load_engine(art, sys.argv[4] if len(sys.argv) > 4 else "auto")
model = eng.model
if model.device.type == "cuda" and len(sys.argv) > 5:
    model.compile_small_ops()
ids = eng.tokenizer.encode("HAMLET. To be, or not to be, that is the question:")
dec = FlagExitDecoder(model, load_specee(Path(art), eng.config), len(ids) + n + 1, mode=sys.argv[6] if len(sys.argv) > 6 else "fill", branches=b,
                      **({} if model.device.type == "cuda" else {"capture": False}))
print("boundaries", sorted(dec.boundaries), flush=True)
t = time.time()
out, st, _ = dec.generate(ids, n)
print("b", b, "mean layers", st.layers / max(st.tokens, 1), "tokens", out[:16], "s", time.time() - t, flush=True)
print(repr(eng.tokenizer.decode(out)))
