"""Offline probe (CPU): do hidden-state features beside the spec's 12 raise the exit predictors' precision?

Usage: python scripts/specee_feature_probe.py ART OUT.json   (ART trained by `mpq train-predictors`, whose
ART.specee-work folder still holds collect.safetensors and draft.safetensors)

Same data, MLP, training, threshold sweep and simulation as mpq/specee/train.py, for three feature sets: the spec's
12; plus the cosine between this layer's final-normed hidden state and the previously evaluated layer's; plus
whether the draft tokens' argmax is the same at both layers. Offline layers: ART's schedule; also every layer.
"""
import json, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
from mpq.runtime.loader import load_engine
from mpq.specee import train as T
from mpq.specee.draft import DraftHead
from mpq.specee.decode import lm_head_weight
from mpq.specee.features import draft_logits, features_from_logits, K_DRAFT

torch.set_num_threads(2)
art = Path(sys.argv[1])
work = art.with_name(art.name + ".specee-work")
ctx = T.Ctx(T.TrainOptions(artifact=art), work, load_engine(str(art), "cpu"))
model = ctx.engine.model; model.requires_grad_(False)
data = T._load(work / "collect.safetensors"); saved = T._load(work / "draft.safetensors")
a = model.args
draft = DraftHead.from_tensors(saved["tensors"], a.n_heads, a.n_kv_heads, a.norm_eps)
draft.bind_rows(lm_head_weight(model).detach())
tokens, hidden, argmax = data["tokens"], data["hidden"], data["argmax"]
n, Tn = tokens.shape; L = argmax.shape[0]
t0 = time.time()
top4 = T._draft_top4(ctx, data, draft).reshape(-1, K_DRAFT)
q = (torch.arange(n)[:, None] * Tn + torch.arange(1, Tn)[None]).reshape(-1)
lm_w = lm_head_weight(model).detach().float()
rows = lm_w[top4]
H = hidden[:, q].float()  # [L, N, D] final-normed
layer_logits = torch.stack([draft_logits(H[i], rows) for i in range(L)])
am = argmax[:, q].long(); ok = am == am[-1:]; verified = (am[..., None] == top4[None]).any(-1)
N = q.numel(); n_val = saved["metrics"]["heldout_windows"] * (Tn - 1)
print("setup", round(time.time() - t0, 1), "s; N", N, "val", n_val, flush=True)
Hn = F.normalize(H, dim=-1)
# prev = -1 (no layer evaluated before): compared with layer 0's state
gen = torch.Generator().manual_seed(0)
gap = torch.randint(1, 4, (L, N), generator=gen)
prev = torch.arange(L)[:, None] - gap
prev = torch.where(torch.rand(L, N, generator=gen) < 0.2, -1, prev).clamp_min(-1)
f12 = features_from_logits(layer_logits, prev)
pidx = prev.clamp_min(0)
Hp = torch.gather(Hn, 0, pidx[..., None].expand(-1, -1, Hn.shape[-1]))
cos = (Hn * Hp).sum(-1, keepdim=True)
same = (layer_logits.argmax(-1) == torch.gather(layer_logits.argmax(-1), 0, pidx)).float()[..., None]
variants = {"spec12": f12, "spec12+cos": torch.cat((f12, cos), -1), "spec12+cos+same": torch.cat((f12, cos, same), -1)}
labels = (ok & verified)[:-1].float()
offline = T._load(work / "predictors.safetensors")["meta"]["offline_layers"]
out = {}
for name, feats_all in variants.items():
    feats = feats_all[:-1]
    P, nf = L - 1, feats.shape[-1]
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(P, nf, 512, generator=g) / nf ** 0.5).requires_grad_()
    b1 = torch.zeros(P, 512, requires_grad=True)
    w2 = (torch.randn(P, 512, generator=g) / 512 ** 0.5).requires_grad_()
    b2 = torch.zeros(P, requires_grad=True)
    tr = slice(n_val, N)
    mu = feats[:, tr].mean(1); sg = feats[:, tr].std(1).clamp_min(1e-4)
    def logits_all(f):
        z = (f - mu[:, None]) / sg[:, None]
        return (torch.relu(torch.baddbmm(b1[:, None], z, w1)) @ w2[:, :, None]).squeeze(-1) + b2[:, None]
    pos = labels[:, tr].sum(1)
    pw = ((N - n_val - pos) / pos.clamp_min(1)).clamp(0.01, 100.0)[:, None]
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=1e-3)
    n_tr = N - n_val
    for ep in range(40):
        perm = torch.randperm(n_tr, generator=g) + n_val
        for b in range(0, n_tr, 1024):
            idx = perm[b:b + 1024]
            loss = F.binary_cross_entropy_with_logits(logits_all(feats[:, idx]), labels[:, idx], pos_weight=pw)
            opt.zero_grad(); loss.backward(); opt.step()
    val = slice(0, n_val)
    with torch.no_grad():
        prob_val = torch.sigmoid(logits_all(feats[:, val]))
    lv = layer_logits[:, val]; Hv = Hn[:, val]
    memo = {}
    def prob_fn(i, pv):
        if (i, pv) not in memo:
            p_prev = torch.softmax(lv[pv], -1) if pv >= 0 else None
            from mpq.specee.features import features
            f = features(lv[i], p_prev)[0]
            base = Hv[max(pv, 0)]
            if nf >= 13:
                f = torch.cat((f, (Hv[i] * base).sum(-1, keepdim=True)), -1)
            if nf >= 14:
                f = torch.cat((f, (lv[i].argmax(-1) == lv[max(pv, 0)].argmax(-1)).float()[:, None]), -1)
            z = (f - mu[i]) / sg[i]
            with torch.no_grad():
                memo[i, pv] = torch.sigmoid(torch.relu(z @ w1[i] + b1[i]) @ w2[i] + b2[i])
        return memo[i, pv]
    res = []
    for prec in T.PRECISION_SWEEP:
        thr = T._thresholds(prob_val, ok[:-1, val], verified[:-1, val], prec)
        d, ag = T.simulate(prob_fn, offline, thr, ok[:, val], verified[:, val], L)
        res.append((prec, round(d, 2), round(ag, 4)))
    allL = list(range(L - 1))
    res_all = []
    for prec in (0.95, 0.97, 0.98):
        thr = T._thresholds(prob_val, ok[:-1, val], verified[:-1, val], prec)
        d, ag = T.simulate(prob_fn, allL, thr, ok[:, val], verified[:, val], L)
        res_all.append((prec, round(d, 2), round(ag, 4)))
    m = T._layer_metrics(prob_val, labels[:, val])
    out[name] = {"sweep_offline": res, "sweep_all_layers": res_all,
                 "precision_at_0.5": [round(x["precision"], 2) for x in m], "recall_at_0.5": [round(x["recall"], 2) for x in m]}
    print(name, json.dumps(out[name]), flush=True)
json.dump({"artifact": str(art), "heldout_tokens": n_val, "offline_layers": offline, "variants": out},
          open(sys.argv[2], "w"), indent=1)
