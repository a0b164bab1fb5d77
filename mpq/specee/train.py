"""`mpq train-predictors`: draft head, exit predictors and schedule for one artifact, trained on calibration text.

Stages (each resumable; outputs in a work folder beside the artifact, a job file with a fingerprint of artifact,
data and settings; a resume with other inputs is refused):
  collect     run the artifact (the engine's CPU reference path) over calibration windows; keep every layer's
              final-normed hidden state (fp16) and its full-vocabulary argmax (the exit labels)
  draft       choose the reduced vocabulary, train the draft head (KL to the target's distribution on it)
  predictors  features of the draft's top-4 at every layer, per-layer MLPs (balanced BCE), held-out metrics,
              the offline schedule and a threshold sweep simulated on held-out tokens
  write       specee.* tensors and the manifest key into the artifact, atomically
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mpq.artifact import atomic_save_tensors, atomic_write_text
from mpq.errors import MpqError
from mpq.progress import layer_progress
from mpq.specee.draft import DraftHead, rope_tables
from mpq.specee.features import K_DRAFT, draft_logits, features, features_from_logits, final_norm, fold_norm
from mpq.specee.predictor import ExitPredictors
from mpq.specee.schedule import auto_layers, expected_layers

JOB_SCHEMA = 1
STAGES = ("collect", "draft", "predictors", "write")
PRECISION_SWEEP = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


@dataclass
class TrainOptions:
    artifact: Path
    dataset: str = "shakespeare"
    samples: int = 24
    seq_len: int = 256
    seed: int = 0
    layers: str = "auto"  # offline schedule: auto | comma-separated layer indices
    budget: int | None = None  # K offline layers (auto: from the histogram and the measured call cost)
    draft_vocab: int = 4096
    draft_inter: int = 384  # a quarter of the target's MLP: measured cheaper at equal agreement (docs/specee.md)
    draft_epochs: int = 12
    draft_samples: int = 0  # extra calibration windows for the draft head only (no per-layer labels)
    pred_epochs: int = 40
    target_agreement: float = 0.985  # simulated on held-out tokens; picks the thresholds
    work: Path | None = None
    restart: bool = False
    label_dtype: str = "bf16"  # the labelling LM-head matmuls (bf16 is ~3x faster on CPUs with AMX)

    def fingerprint(self, artifact_fp: str) -> str:
        keep = {k: v for k, v in asdict(self).items() if k not in ("work", "restart", "artifact")}
        return hashlib.sha256(json.dumps([artifact_fp, keep], sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Ctx:
    opts: TrainOptions
    work: Path
    engine: object = None
    state: dict = field(default_factory=dict)


def _save(path: Path, obj: dict) -> None:
    """A work file: tensors (top level, or one dict deep) through safetensors, everything else as JSON metadata;
    never pickle, so a tampered work folder cannot run code."""
    tensors, rest = {}, {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            rest[key] = value
    atomic_save_tensors(path, tensors, metadata={"json": json.dumps(rest)})


def _load(path: Path) -> dict:
    """Inverse of `_save`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        obj = json.loads((f.metadata() or {}).get("json", "{}"))
        for name in f.keys():
            if "/" in name:
                outer, inner = name.split("/", 1)
                obj.setdefault(outer, {})[inner] = f.get_tensor(name)
            else:
                obj[name] = f.get_tensor(name)
    return obj


def _write_job(work: Path, job: dict) -> None:
    atomic_write_text(work / "job.json", json.dumps(job, indent=1))


def _open_job(opts: TrainOptions, work: Path, fp: str) -> dict:
    job_file = work / "job.json"
    if job_file.is_file() and not opts.restart:
        job = json.loads(job_file.read_text())
        if job.get("schema_version") != JOB_SCHEMA or job.get("fingerprint") != fp:
            raise MpqError(f"{work} holds a run with other inputs (artifact, data or settings differ); "
                           "pass --restart to discard it")
        return job
    work.mkdir(parents=True, exist_ok=True)
    job = {"schema_version": JOB_SCHEMA, "fingerprint": fp, "done": []}
    _write_job(work, job)
    return job


# ---- collect ---------------------------------------------------------------------------------------------
def collect(ctx: Ctx) -> None:
    from mpq.calib.data import load_token_windows
    from mpq.specee.decode import ExitDecoder, lm_head_weight

    o, model = ctx.opts, ctx.engine.model
    windows = load_token_windows(o.dataset, ctx.engine.tokenizer, o.samples, o.seq_len, o.seed)
    n, T = windows.shape
    L, D = model.args.n_layers, model.args.dim
    runner = ExitDecoder(model, None, T, exits=False)
    lm_w = lm_head_weight(model).to(torch.bfloat16 if o.label_dtype == "bf16" else torch.float32)
    hidden = torch.empty(L, n * T, D, dtype=torch.float16)
    argmax = torch.empty(L, n * T, dtype=torch.int32)
    pos = torch.arange(T)
    mask = model.causal[pos].view(1, 1, T, -1)
    from mpq.runtime.model import SmallOps

    with layer_progress(n, "collect hidden states", unit="window") as advance, torch.inference_mode():
        for w in range(n):
            x = F.embedding(windows[w:w + 1], model.embed)
            sl = slice(w * T, (w + 1) * T)
            for i in range(L):
                x = runner.run_layer(i, x, pos, mask, SmallOps())
                hn = final_norm(x[0], model.norm, model.args.norm_eps)
                hidden[i, sl] = hn.half()
                argmax[i, sl] = (hn.to(lm_w.dtype) @ lm_w.t()).argmax(-1).int()
            advance(w)
    _save(ctx.work / "collect.safetensors", {"tokens": windows, "hidden": hidden, "argmax": argmax})


def earliest_match(match: torch.Tensor) -> torch.Tensor:
    """[N] earliest layer index where match [L, N] holds (the last layer always matches itself)."""
    L = match.shape[0]
    idx = torch.arange(L).view(L, 1).expand_as(match)
    return torch.where(match, idx, L - 1).amin(0)


def oracle_layers(argmax: torch.Tensor) -> torch.Tensor:
    """[N] earliest layer index whose argmax equals the last layer's (the exit oracle)."""
    return earliest_match(argmax == argmax[-1:])


# ---- draft -----------------------------------------------------------------------------------------------
def _draft_inputs(hidden, argmax, n, T, seed):
    """Per position, the normed hidden state the draft sees for the previous token: the final layer's, or for
    half the positions (as after an exit) that of a random layer at or past the previous token's oracle layer."""
    L, N = argmax.shape
    gen = torch.Generator().manual_seed(seed)
    ora = oracle_layers(argmax)
    pick = ora + (torch.rand(N, generator=gen) * (L - ora).float()).long().clamp_max(L - 1 - ora)
    pick = torch.where(torch.rand(N, generator=gen) < 0.5, torch.full_like(pick, L - 1), pick.clamp_max(L - 1))
    return hidden[pick, torch.arange(N)].view(n, T, -1)


def _final_hidden(ctx: Ctx, samples: int, T: int, seed: int) -> dict:
    """Final-normed hidden states of up to `samples` more calibration windows, none overlapping the labelled ones
    (cached in the work folder)."""
    from mpq.calib.data import held_out_windows
    from mpq.runtime.model import SmallOps
    from mpq.specee.decode import ExitDecoder, lm_head_weight

    path = ctx.work / "draft-data.safetensors"
    if path.is_file():
        return _load(path)
    model = ctx.engine.model
    # disjoint from the labelled windows, so the held-out recall below stays held out
    windows = held_out_windows(ctx.opts.dataset, ctx.engine.tokenizer, ctx.opts.samples, T, seed, samples)
    samples = windows.shape[0]
    runner = ExitDecoder(model, None, T, exits=False)
    pos = torch.arange(T)
    mask = model.causal[pos].view(1, 1, T, -1)
    out = torch.empty(samples, T, model.args.dim)
    top = torch.empty(samples, T, dtype=torch.int32)
    lm_w = lm_head_weight(model).to(torch.bfloat16)
    with layer_progress(samples, "draft data (final hidden states)", unit="window") as advance, torch.inference_mode():
        for w in range(samples):
            x = F.embedding(windows[w:w + 1], model.embed)
            for i in range(model.args.n_layers):
                x = runner.run_layer(i, x, pos, mask, SmallOps())
            out[w] = final_norm(x[0], model.norm, model.args.norm_eps)
            top[w] = (out[w].to(lm_w.dtype) @ lm_w.t()).argmax(-1).int()
            advance(w)
    data = {"tokens": windows, "hidden": out, "argmax": top}
    _save(path, data)
    return data


def choose_vocab(argmax_final: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    counts = torch.bincount(argmax_final.long())
    size = min(size, int((counts > 0).sum()))
    vocab = counts.topk(size).indices.sort().values
    return vocab, float(counts[vocab].sum() / counts.sum())


def train_draft(ctx: Ctx) -> None:
    o, model = ctx.opts, ctx.engine.model
    data = _load(ctx.work / "collect.safetensors")
    tokens, hidden, argmax = data["tokens"], data["hidden"], data["argmax"]
    n, T = tokens.shape
    a = model.args
    extra = _final_hidden(ctx, o.draft_samples, T, o.seed) if o.draft_samples else None
    predicted = argmax[-1] if extra is None else torch.cat((argmax[-1], extra["argmax"].reshape(-1)))
    vocab, coverage = choose_vocab(predicted, o.draft_vocab)
    from mpq.specee.bundle import quantized_draft_tensors
    from mpq.specee.decode import lm_head_weight

    draft = DraftHead(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, o.draft_inter, a.norm_eps, vocab, seed=o.seed)
    draft.bind_rows(lm_head_weight(model).detach())
    from mpq.runtime.model import rope_inv_freq

    cos, sin = rope_tables(rope_inv_freq(a), T - 1)
    h_in = _draft_inputs(hidden, argmax, n, T, o.seed)[:, :-1].float()
    emb = model.embed[tokens[:, 1:]].float()
    final = hidden[-1].view(n, T, -1)[:, 1:].float()
    if extra is not None:  # more text for the draft only: final hidden states, no per-layer labels (cheap)
        h_in = torch.cat((h_in, extra["hidden"][:, :-1]))
        emb = torch.cat((emb, model.embed[extra["tokens"][:, 1:]].float()))
        final = torch.cat((final, extra["hidden"][:, 1:]))
    with torch.no_grad():
        target = F.log_softmax(final @ draft.rows.t(), -1)
    n_val, n_lab = max(1, n // 8), n  # held-out: the first windows of the labelled set (the predictors' too)
    n = h_in.shape[0]
    opt = torch.optim.AdamW([p for p in draft.parameters()], lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(o.seed)
    batch = 4
    steps = o.draft_epochs * -(-(n - n_val) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 1), pct_start=0.1)
    with layer_progress(o.draft_epochs, "train draft head", unit="epoch") as advance:
        for ep in range(o.draft_epochs):
            perm = torch.randperm(n - n_val, generator=gen) + n_val
            for b in range(0, n - n_val, batch):
                idx = perm[b:b + batch]
                logp = F.log_softmax(draft(h_in[idx], emb[idx], cos, sin), -1)
                loss = F.kl_div(logp, target[idx], log_target=True, reduction="batchmean") / (T - 1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            advance(ep, f"loss {float(loss.detach()):.3f}")
    draft.eval()
    with torch.no_grad():
        top4 = draft.propose(draft(h_in[:n_val], emb[:n_val], cos, sin))
    truth = argmax[-1].view(n_lab, T)[:n_val, 1:].long()

    def scores(top4: torch.Tensor) -> tuple[float, float]:  # held-out top-4 recall and top-1
        return float((top4 == truth[..., None]).any(-1).float().mean()), float((top4[..., 0] == truth).float().mean())

    recall, top1 = scores(top4)
    ctx.state["draft"] = {"vocab_size": int(vocab.numel()), "vocab_coverage": coverage, "inter": o.draft_inter,
                          "heldout_top4_recall": recall, "heldout_top1": top1, "heldout_windows": n_val}
    packed = _quantize_draft(ctx, draft, lambda: draft.propose(draft(h_in[:n_val], emb[:n_val], cos, sin)), scores)
    quantized = {"quantized": quantized_draft_tensors(packed),
                 "quantized_linears": {n: p.meta() for n, p in packed.items()}} if packed else {}
    _save(ctx.work / "draft.safetensors", {"tensors": draft.tensors(), "metrics": ctx.state["draft"], **quantized})


def _quantize_draft(ctx: Ctx, draft: DraftHead, propose_heldout, scores) -> dict:
    """The draft as the GPU decoders run it (`DraftHead.quantize`, at the artifact's bits/weight: {name:
    PackedLinear}), its held-out scores beside the float draft's in ctx.state["draft"]["quantized"]; empty where a
    shape does not fit the format (the decoders then run the float draft)."""
    from mpq.artifact import read_manifest

    bits = min(max(float(read_manifest(ctx.opts.artifact)[1].get("bits_per_weight", 3.0)), 2.5), 4.0)
    try:
        packed = draft.quantize(bits)
    except MpqError as e:
        ctx.state["draft"]["quantized"] = {"skipped": str(e)}
        return {}
    draft.use_quantized(packed, "cpu")
    try:
        with torch.no_grad():
            recall, top1 = scores(propose_heldout())
    finally:
        draft.linears = None
    ctx.state["draft"]["quantized"] = {"bits_per_weight": bits, "heldout_top4_recall": recall, "heldout_top1": top1}
    return packed


# ---- predictors ------------------------------------------------------------------------------------------
def _draft_top4(ctx: Ctx, data: dict, draft: DraftHead) -> torch.Tensor:
    """Draft top-4 for every target position q >= 1 of every window: [n, T-1, 4]."""
    from mpq.runtime.model import rope_inv_freq

    tokens, hidden, argmax = data["tokens"], data["hidden"], data["argmax"]
    n, T = tokens.shape
    a = ctx.engine.model.args
    cos, sin = rope_tables(rope_inv_freq(a), T - 1)
    h_in = _draft_inputs(hidden, argmax, n, T, ctx.opts.seed + 1)[:, :-1].float()
    emb = ctx.engine.model.embed[tokens[:, 1:]].float()
    with torch.no_grad():
        return torch.cat([draft.propose(draft(h_in[w:w + 4], emb[w:w + 4], cos, sin)) for w in range(0, n, 4)])


def _call_cost(model, pred: ExitPredictors) -> float:
    """A predicted layer (features + predictor, as the CPU decoder runs them) in decoder-layer units, timed on this
    machine right after a layer, as in decoding: the layer's weights evict the predictor's from the caches, which
    makes the call two to three times as dear as timed alone."""
    from mpq.runtime.model import SmallOps
    from mpq.specee.decode import ExitDecoder

    runner = ExitDecoder(model, None, 8, exits=False)
    x = model.embed[:1].view(1, 1, -1)
    pos = torch.zeros(1, dtype=torch.long)
    mask = model.causal[pos].view(1, 1, 1, -1)
    rows_w = fold_norm(model.embed[:K_DRAFT], model.norm)
    eps = model.args.norm_eps

    layer_s, call_s = [], []
    with torch.inference_mode():
        for _ in range(21):
            t0 = time.perf_counter()
            y = runner.run_layer(0, x, pos, mask, SmallOps())
            t1 = time.perf_counter()
            pred.prob_from_hidden(pred.layers[0], y, rows_w, eps, None)
            layer_s.append(t1 - t0)
            call_s.append(time.perf_counter() - t1)
    return sorted(call_s)[10] / sorted(layer_s)[10]


def _thresholds(prob: torch.Tensor, ok: torch.Tensor, verified: torch.Tensor, precision: float) -> torch.Tensor:
    """Per layer, the lowest threshold whose verified exits on held-out tokens reach `precision` (1.01: never)."""
    grid = torch.linspace(0.05, 0.99, 95)
    out = torch.full((prob.shape[0],), 1.01)
    for s in range(prob.shape[0]):
        for t in grid:
            fire = (prob[s] > t) & verified[s]
            if fire.sum() >= 5 and float(ok[s][fire].float().mean()) >= precision:
                out[s] = t
                break
    return out


def simulate(prob_fn, layers: list[int], thr: torch.Tensor, ok: torch.Tensor, verified: torch.Tensor, L: int):
    """(mean executed layers, agreement) on held-out tokens, exiting at the first offline layer that fires and
    verifies; prob_fn(i, prev) -> [N] exit probabilities at layer i with `prev` as the previously evaluated layer."""
    N = ok.shape[1]
    done = torch.zeros(N, dtype=torch.bool)
    depth = torch.full((N,), float(L))
    correct = torch.ones(N, dtype=torch.bool)
    prev = -1
    for i in layers:
        fire = (prob_fn(i, prev) > thr[i]) & verified[i] & ~done
        depth[fire] = i + 1
        correct[fire] = ok[i][fire]
        done |= fire
        prev = i
    return float(depth.mean()), float(correct.float().mean())


def train_predictors(ctx: Ctx) -> None:
    from mpq.specee.decode import lm_head_weight

    o, model = ctx.opts, ctx.engine.model
    data = _load(ctx.work / "collect.safetensors")
    saved = _load(ctx.work / "draft.safetensors")
    a = model.args
    draft = DraftHead.from_tensors(saved["tensors"], a.n_heads, a.n_kv_heads, a.norm_eps)
    draft.bind_rows(lm_head_weight(model).detach())
    tokens, hidden, argmax = data["tokens"], data["hidden"], data["argmax"]
    n, T = tokens.shape
    L = argmax.shape[0]
    top4 = _draft_top4(ctx, data, draft).reshape(-1, K_DRAFT)  # [n*(T-1), 4]
    q = (torch.arange(n)[:, None] * T + torch.arange(1, T)[None]).reshape(-1)
    lm_w = lm_head_weight(model).detach().float()
    rows = lm_w[top4]
    layer_logits = torch.stack([draft_logits(hidden[i, q].float(), rows) for i in range(L)])  # [L, N, 4]
    am = argmax[:, q].long()
    ok = am == am[-1:]
    verified = (am[..., None] == top4[None]).any(-1)
    N = q.numel()
    n_val = saved["metrics"]["heldout_windows"] * (T - 1)
    gen = torch.Generator().manual_seed(o.seed)
    gap = torch.randint(1, 4, (L, N), generator=gen)
    prev = torch.arange(L)[:, None] - gap
    prev = torch.where(torch.rand(L, N, generator=gen) < 0.2, -1, prev).clamp_min(-1)
    feats = features_from_logits(layer_logits, prev)[:-1]  # predictors on layers 0..L-2
    # label: an exit here would be taken and right (argmax = final token AND among the draft's 4, so verification
    # passes); the paper's label (argmax = final) also fires where verification must reject, at a full LM head each
    labels = (ok & verified)[:-1].float()
    P = L - 1
    pred = ExitPredictors(list(range(P)), seed=o.seed)
    tr = slice(n_val, N)
    with torch.no_grad():
        pred.mu.copy_(feats[:, tr].mean(1))
        pred.sigma.copy_(feats[:, tr].std(1).clamp_min(1e-4))
    pos = labels[:, tr].sum(1)
    pos_weight = ((N - n_val - pos) / pos.clamp_min(1)).clamp(0.01, 100.0)[:, None]
    opt = torch.optim.Adam(pred.parameters(), lr=1e-3)
    n_tr = N - n_val
    with layer_progress(o.pred_epochs, "train exit predictors", unit="epoch") as advance:
        for ep in range(o.pred_epochs):
            perm = torch.randperm(n_tr, generator=gen) + n_val
            for b in range(0, n_tr, 1024):
                idx = perm[b:b + 1024]
                z = pred.logits_all(feats[:, idx])
                loss = F.binary_cross_entropy_with_logits(z, labels[:, idx], pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
            advance(ep, f"loss {float(loss.detach()):.3f}")
    pred.eval()
    _finish_predictors(ctx, pred, layer_logits, ok, verified, n_val, L, feats, labels)


def _layer_metrics(prob: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    out = []
    for s in range(prob.shape[0]):
        fire, y = prob[s] > 0.5, labels[s] > 0.5
        tp = float((fire & y).sum())
        out.append({"layer": s, "positives": float(y.float().mean()), "accuracy": float((fire == y).float().mean()),
                    "precision": tp / max(float(fire.sum()), 1.0), "recall": tp / max(float(y.sum()), 1.0)})
    return out


def _finish_predictors(ctx, pred, layer_logits, ok, verified, n_val, L, feats, labels) -> None:
    o = ctx.opts
    val = slice(0, n_val)
    with torch.no_grad():
        prob_val = torch.sigmoid(pred.logits_all(feats[:, val]))
    metrics = _layer_metrics(prob_val, labels[:, val])
    ora = earliest_match(ok)
    hist = torch.bincount(ora[n_val:], minlength=L).float()
    call_cost = _call_cost(ctx.engine.model, pred)
    if o.layers != "auto":
        offline = sorted({int(x) for x in o.layers.split(",")})
        if not offline or min(offline) < 0 or max(offline) > L - 2:
            raise MpqError(f"--layers must be layer indices in [0, {L - 2}]")
    elif o.budget:
        from mpq.specee.schedule import best_layers

        offline = best_layers(hist, o.budget)
    else:
        offline = auto_layers(hist, call_cost)
    lv = layer_logits[:, val]

    memo = {}

    def prob_fn(i, prev):
        if (i, prev) not in memo:
            p_prev = None if prev < 0 else torch.softmax(lv[prev], -1)
            with torch.no_grad():
                memo[i, prev] = torch.sigmoid(pred.logits_one(i, features(lv[i], p_prev)[0]))
        return memo[i, prev]

    sweep, best = [], None
    for prec in PRECISION_SWEEP:
        thr = _thresholds(prob_val, ok[:-1, val], verified[:-1, val], prec)
        depth, agree = simulate(prob_fn, offline, thr, ok[:, val], verified[:, val], L)
        sweep.append({"precision": prec, "mean_layers": depth, "agreement": agree})
        if agree >= o.target_agreement and (best is None or depth < best[1]):
            best = (thr, depth, prec)
    if best is None:
        best = (_thresholds(prob_val, ok[:-1, val], verified[:-1, val], PRECISION_SWEEP[-1]), float(L), PRECISION_SWEEP[-1])
    with torch.no_grad():
        pred.threshold.copy_(best[0])
    oracle_mean = float((ora[:n_val] + 1).float().mean())
    ideal, _ = expected_layers(torch.bincount(ora[:n_val], minlength=L).float(), offline)
    ctx.state["predictors"] = {
        "offline_layers": offline, "call_cost_layers": call_cost, "layer_metrics": metrics, "sweep": sweep,
        "chosen_precision": best[2], "simulated_mean_layers": best[1], "heldout_oracle_layers": oracle_mean,
        "heldout_schedule_ideal_layers": ideal, "heldout_tokens": n_val}
    _save(ctx.work / "predictors.safetensors", {"tensors": pred.tensors(), "layers": pred.layers, "meta": ctx.state["predictors"]})


# ---- write and driver ------------------------------------------------------------------------------------
def write(ctx: Ctx) -> None:
    from mpq.calib.data import dataset_fingerprint
    from mpq.specee.bundle import write_specee

    o = ctx.opts
    d, p = _load(ctx.work / "draft.safetensors"), _load(ctx.work / "predictors.safetensors")
    tensors = {**d["tensors"], **p["tensors"], "specee.offline_layers": torch.tensor(p["meta"]["offline_layers"])}
    tensors.update(d.get("quantized", {}))
    meta = {"predictor_layers": p["layers"], "offline_layers": p["meta"]["offline_layers"], "draft": d["metrics"],
            "predictors": p["meta"], "data": {"dataset": dataset_fingerprint(o.dataset), "samples": o.samples,
                                              "seq_len": o.seq_len, "seed": o.seed}}
    if "quantized" in d:
        meta["draft_quantized"] = d["quantized_linears"]
    write_specee(o.artifact, tensors, meta)
    ctx.state.update(draft=d["metrics"], predictors=p["meta"])


STAGE_FNS = {"collect": collect, "draft": train_draft, "predictors": train_predictors, "write": write}


def train_predictors_cli(opts: TrainOptions) -> dict:
    """Run (or resume) the stages; return the summary (also printed)."""
    from mpq.artifact import read_manifest
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import artifact_fingerprint

    opts.artifact = Path(opts.artifact)
    _, manifest, _ = read_manifest(opts.artifact)
    if "quantization_config" not in json.loads((opts.artifact / "config.json").read_text()):
        raise MpqError(f"{opts.artifact} is not an mpq artifact")
    if opts.samples < 2 or opts.seq_len < 16:
        raise MpqError("need --samples >= 2 and --seq-len >= 16")
    if opts.draft_samples < 0 or opts.draft_inter < 1:
        raise MpqError("need --draft-samples >= 0 and --draft-inter >= 1")
    work = Path(opts.work or opts.artifact.with_name(opts.artifact.name + ".specee-work"))
    job = _open_job(opts, work, opts.fingerprint(artifact_fingerprint(manifest)))
    torch.manual_seed(opts.seed)
    ctx = Ctx(opts, work, load_engine(str(opts.artifact), "cpu"))
    ctx.engine.model.requires_grad_(False)
    t0 = time.perf_counter()
    for stage in STAGES:
        if stage in job["done"] and stage != "write":
            continue
        STAGE_FNS[stage](ctx)
        job["done"] = sorted(set(job["done"]) | {stage}, key=STAGES.index)
        _write_job(work, job)
    summary = {"artifact": str(opts.artifact), "seconds": round(time.perf_counter() - t0, 1), **ctx.state}
    _print_summary(summary)
    return summary


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    d, p = s["draft"], s["predictors"]
    c = Console(stderr=True)
    c.print(f"draft head: reduced vocabulary {d['vocab_size']} tokens (covers {100 * d['vocab_coverage']:.1f}% of the "
            f"model's predictions), MLP width {d['inter']}; held-out top-4 recall {100 * d['heldout_top4_recall']:.1f}%, "
            f"top-1 {100 * d['heldout_top1']:.1f}%")
    q = d.get("quantized", {})
    if "heldout_top4_recall" in q:
        c.print(f"quantized for the GPU ({q['bits_per_weight']:.2f} bits/weight, head 4-bit): held-out top-4 recall "
                f"{100 * q['heldout_top4_recall']:.1f}%, top-1 {100 * q['heldout_top1']:.1f}%")
    elif "skipped" in q:
        c.print(f"the draft stays in float on the GPU: {q['skipped']}")
    t = Table(title="exit predictors (held-out, threshold 0.5)", title_justify="left")
    for col in ("layer", "positives", "accuracy", "precision", "recall"):
        t.add_column(col, justify="right")
    for m in p["layer_metrics"]:
        t.add_row(str(m["layer"]), *(f"{100 * m[k]:.1f}%" for k in ("positives", "accuracy", "precision", "recall")))
    c.print(t)
    c.print(f"offline schedule: layers {p['offline_layers']} (a predicted layer costs {p['call_cost_layers']:.3f} decoder layers)")
    for r in p["sweep"]:
        c.print(f"  precision target {r['precision']:.3f}: simulated mean layers {r['mean_layers']:.2f}, agreement {100 * r['agreement']:.2f}%")
    c.print(f"chosen: precision {p['chosen_precision']} -> simulated {p['simulated_mean_layers']:.2f} layers "
            f"(held-out oracle {p['heldout_oracle_layers']:.2f}); wrote specee.* into {s['artifact']} in {s['seconds']} s")
