"""Temporary (GPU): where mpq run's decode time goes with exits on the real artifact: per-step host times of the exit decoder, the hand-over, the engine's resumed steps. argv = ARTIFACT."""
import sys, time, json
import torch
from mpq.runtime.loader import load_engine
from mpq.runtime.generate import Generator, Sampling
from mpq.specee import decode as sd
from mpq.specee.flag_decode import FlagExitDecoder

art = sys.argv[1]
eng = load_engine(art, "cuda")
ids = eng.tokenizer.encode("HAMLET. To be, or not to be, that is the question:")
marks = []
step = FlagExitDecoder.step
def timed_step(self, *a):
    r = step(self, *a); torch.cuda.synchronize(); marks.append(time.perf_counter()); return r
FlagExitDecoder.step = timed_step
prefill = sd.ExitDecoder._prefill
def timed_prefill(self, p):
    t = time.perf_counter(); r = prefill(self, p); t2 = time.perf_counter(); torch.cuda.synchronize(); t3 = time.perf_counter()
    print("prefill host ms", round(1000 * (t2 - t), 2), "gpu tail ms", round(1000 * (t3 - t2), 2)); marks.append(t3); return r
sd.ExitDecoder._prefill = timed_prefill
resume = Generator.resume
def timed_resume(self, *a, **k):
    t = time.perf_counter(); g = resume(self, *a, **k); print("resume wall ms", round(1000 * (time.perf_counter() - t), 2), "decode_ms", round(g.decode_ms, 2), "steps", g.decode_steps); return g
Generator.resume = timed_resume
for rnd in range(2):
    marks.clear()
    gen = Generator(eng.model, len(ids) + 128)
    g, info = sd.run_with_exits(eng, art, ids, 128, Sampling(), set(), None, gen)
    d = [round(1000 * (b - a), 3) for a, b in zip(marks, marks[1:])]
    print("round", rnd, "decode_ms", round(g.decode_ms, 2), "per token", round(g.decode_ms / g.decode_steps, 3), "exit steps", len(d))
    print("  exit step ms:", d)
    ref = Generator(eng.model, len(ids) + 128).generate(ids, 128)
    print("  engine", round(ref.decode_ms_per_token, 3), "same", ref.tokens == g.tokens)
