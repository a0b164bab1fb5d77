"""`mpq verify`: can a received artifact be trusted before it is served?

Four checks, each one line with pass/fail and its figure; the command exits 0 only if none fails.

1. integrity: the format version is known, every tensor the manifest lists is present with its dtype,
   shape and sha256, no tensor is unlisted, the layout of every quantized linear is valid, and config.json,
   the stored tensors and the tokenizer agree (vocabulary size, hidden size, layer count, linears per layer).
2. kernels: every quantized linear, run through `QuantLinear` on the chosen device (Triton on CUDA, the
   reference path on the CPU), against a matmul with a dequantization written here a second time, straight
   from docs/format.md, per element (index arithmetic on the packed words; no unpack-then-scatter, so it
   shares no code with `PackedLinear.dequantize`). Bounds are relative Frobenius errors against a float64
   matmul, and the largest element error relative to max |output| (one wrong tile in a large layer): fp32 on
   the CPU 1e-5 (summation order only), fp16 on CUDA 2e-3 (fp16 output rounding is ~5e-4).
3. quality: perplexity on a short fixed protocol (`QUALITY_PROTOCOL`: the first 2 windows of 256 tokens
   of Hamlet, as `mpq eval` cuts them) against `manifest["verify_reference"]`, which the quantizer records
   with `reference_quality` on the same protocol; fails when worse by more than `QUALITY_TOLERANCE`.
4. predictors: the `specee.*` tensors, when present: recorded in the manifest and all finite ("n/a" if absent).

Test hooks (read only here; they make a check fail the way a real fault would, so tests can show the line):
MPQ_TEST_BREAK_KERNEL=1 flips the low code bit of one tile's words in the copy handed to the kernel;
MPQ_TEST_QUALITY_REGRESSION=1 adds noise (ten times each weight's std) to every dequantized linear before the
perplexity run.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mpq.errors import ArtifactError, MpqError

QUALITY_PROTOCOL = {"dataset": "shakespeare:hamlet", "windows": 2, "seq_len": 256}
QUALITY_TOLERANCE = 0.02  # relative: stored fp16 floats vs the fp32 ones measured at quantize time move ppl ~0.1%
KERNEL_BOUNDS = {"cpu": 1e-5, "cuda": 2e-3}
KERNEL_ROWS = {"cpu": (1, 8), "cuda": (1, 16, 80)}  # activation rows: GEMV, GEMM and prefill kernels on CUDA
LINEARS_PER_LAYER = 7


@dataclass
class Check:
    name: str
    status: str  # "pass" | "fail" | "n/a" | "skipped"
    figure: str

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "skipped")

    def line(self) -> str:
        return f"{self.name:<11s} {self.status.upper():<7s} {self.figure}"


# ---- 1. integrity ---------------------------------------------------------------------------------------


def check_integrity(path: Path):
    """(Check, Artifact or None): tensors against the manifest, then layout and config consistency."""
    from safetensors import SafetensorError, safe_open

    from mpq.artifact import _DTYPE_NAMES, load_artifact, read_manifest, tensor_sha256

    try:
        config, manifest, files = read_manifest(path)
    except ArtifactError as e:
        return Check("integrity", "fail", str(e)), None
    entries = manifest["tensors"]
    seen, bad_hash, bad_meta = set(), [], []
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    seen.add(name)
                    e = entries.get(name)
                    if not isinstance(e, dict):
                        continue
                    if e.get("dtype") != _DTYPE_NAMES.get(t.dtype) or e.get("shape") != list(t.shape):
                        bad_meta.append(name)
                    elif e.get("sha256") != tensor_sha256(t):
                        bad_hash.append(name)
    except (SafetensorError, OSError) as e:
        return Check("integrity", "fail", f"unreadable tensors: {str(e)[:160]}"), None
    missing, unknown = sorted(set(entries) - seen), sorted(seen - set(entries))
    problems = []
    for what, names in (("missing", missing), ("unknown", unknown), ("dtype/shape differ", bad_meta),
                        ("sha256 mismatch", bad_hash)):
        if names:
            problems.append(f"{len(names)} {what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    if problems:
        return Check("integrity", "fail", f"{len(entries)} tensors; " + "; ".join(problems)), None
    try:
        art = load_artifact(path, check_hashes=False)  # hashes done above; this validates every layout
        consistency(art, path)
    except ArtifactError as e:
        return Check("integrity", "fail", str(e)), None
    return Check("integrity", "pass", f"format v{manifest['format_version']}, {len(entries)} tensors sha256 ok, "
                                      f"{len(art.linears)} quantized linears, config/tokenizer consistent"), art


def consistency(art, path: Path) -> None:
    """config.json, the stored tensors and the tokenizer describe the same model."""
    cfg = art.config
    try:
        vocab, hidden, layers = int(cfg["vocab_size"]), int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError("config.json lacks vocab_size / hidden_size / num_hidden_layers") from None
    emb = art.floats.get("model.embed_tokens.weight")
    if emb is None or list(emb.shape) != [vocab, hidden]:
        raise ArtifactError(f"embedding shape {None if emb is None else list(emb.shape)} differs from config "
                            f"vocab_size x hidden_size = {vocab} x {hidden}")
    head = art.floats.get("lm_head.weight")
    if head is not None and list(head.shape) != [vocab, hidden]:
        raise ArtifactError(f"lm_head shape {list(head.shape)} differs from config {vocab} x {hidden}")
    float_linears = art.manifest.get("float_linears") or []
    if not isinstance(float_linears, list):
        raise ArtifactError("manifest float_linears is not a list")
    per_layer: dict[int, int] = {}
    for fqn in [*art.linears, *float_linears]:
        m = re.match(r"model\.layers\.(\d+)\.", str(fqn))
        if m is None:
            raise ArtifactError(f"linear {fqn!r} is not inside a decoder layer")
        per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + 1
    if sorted(per_layer) != list(range(layers)) or any(n != LINEARS_PER_LAYER for n in per_layer.values()):
        raise ArtifactError(f"linears cover layers {sorted(per_layer)[:4]}... with counts {sorted(set(per_layer.values()))}; "
                            f"config says {layers} layers of {LINEARS_PER_LAYER}")
    tok = _tokenizer(path)
    if tok is not None and len(tok) > vocab:
        raise ArtifactError(f"tokenizer has {len(tok)} tokens, more than the config's vocab_size {vocab}")


def _tokenizer(path: Path):
    if not any(Path(path).glob("tokenizer*")):
        return None
    from mpq.models import load_tokenizer, resolve_model

    try:
        return load_tokenizer(resolve_model(str(path)))
    except MpqError as e:
        raise ArtifactError(str(e)) from None


# ---- 2. kernels -----------------------------------------------------------------------------------------


def independent_dequantize(p) -> torch.Tensor:
    """W [N, K] in float64, from the packed tensors by the formulas of docs/format.md, one element at a time
    (vectorised as index arithmetic): which slot holds column c of row tile t, which word and shift hold the
    code, which byte and shift hold the zero."""
    N, K, g, R = p.out_features, p.in_features, p.group_size, p.tile_rows
    G, T = K // g, N // R
    dev = p.q2.device
    r = torch.arange(N, device=dev).view(N, 1).expand(N, K)
    col = torch.arange(K, device=dev).view(1, K).expand(N, K)
    t, i, c, e = r // R, r % R, col // g, col % g
    # inverse tile map: slot of (t, c) in its precision, and which precision
    slot = torch.full((T, G), -1, dtype=torch.long, device=dev)
    is4 = torch.zeros((T, G), dtype=torch.bool, device=dev)
    tt = torch.arange(T, device=dev).view(T, 1)
    if p.idx2.shape[1]:
        slot[tt.expand_as(p.idx2), p.idx2.long()] = torch.arange(p.idx2.shape[1], device=dev).expand_as(p.idx2)
    if p.idx4.shape[1]:
        slot[tt.expand_as(p.idx4), p.idx4.long()] = torch.arange(p.idx4.shape[1], device=dev).expand_as(p.idx4)
        is4[tt.expand_as(p.idx4), p.idx4.long()] = True
    if bool((slot < 0).any()):
        raise ArtifactError("tile map leaves a group column unassigned")
    s, four = slot[t, c], is4[t, c]
    w = torch.zeros(N, K, dtype=torch.float64, device=dev)
    for bits, sel in ((2, ~four), (4, four)):
        if not bool(sel.any()):
            continue
        q, sc, z, ss = (getattr(p, f"{n}{bits}") for n in ("q", "s", "z", "ss"))
        tb, ib, sb, eb, rb = t[sel], i[sel], s[sel], e[sel], r[sel]
        words = g * bits // 32
        word = q[tb, sb, ib, eb % words].long() & 0xFFFFFFFF
        code = (word >> ((eb // words) * bits)) & ((1 << bits) - 1)
        per_byte = 8 // bits
        zero = (z[tb, sb, ib // per_byte].long() >> ((ib % per_byte) * bits)) & ((1 << bits) - 1)
        scale = ss[rb].double() * sc[tb, sb, ib].double()
        w[sel] = scale * (code - zero).double()
    if p.outliers and p.idx2.shape[1]:
        T_, n2, R_, k = p.oi.shape
        tt4 = torch.arange(T_, device=dev).view(T_, 1, 1, 1).expand(T_, n2, R_, k)
        ii4 = torch.arange(R_, device=dev).view(1, 1, R_, 1).expand(T_, n2, R_, k)
        rows = tt4 * R + ii4
        cols = p.idx2.long().view(T_, n2, 1, 1).expand(T_, n2, R_, k) * g + p.oi.long()
        w.index_put_((rows.reshape(-1), cols.reshape(-1)), p.ov.double().reshape(-1), accumulate=True)
    return w


def _broken_copy(p):
    """Test hook: the lowest code of every word of the first (row tile, slot) off by one, as a kernel misreading
    one tile would compute."""
    from dataclasses import replace

    name = "q2" if p.q2.numel() else "q4"
    q = getattr(p, name).clone()
    q[0, 0] ^= 1
    return replace(p, **{name: q})


def kernel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The larger of the relative Frobenius error and the largest element error relative to max |ref|: the first
    catches errors spread thin, the second one wrong tile in a large output."""
    if not torch.isfinite(y).all():
        return math.inf
    diff = y - ref
    frob = float(diff.norm() / ref.norm().clamp_min(1e-30))
    peak = float(diff.abs().max() / ref.abs().max().clamp_min(1e-30))
    return max(frob, peak)


def check_kernels(art, device: torch.device) -> Check:
    """QuantLinear forward on `device` vs x @ independent_dequantize(W).T in float64, per linear."""
    from mpq.runtime.quant_linear import QuantLinear

    if not art.linears:
        return Check("kernels", "n/a", "no quantized linears")
    kind = device.type
    bound, dtype = KERNEL_BOUNDS[kind], (torch.float32 if kind == "cpu" else torch.float16)
    broken = os.environ.get("MPQ_TEST_BREAK_KERNEL") == "1"
    gen = torch.Generator().manual_seed(0)
    worst, worst_name, failures = 0.0, "", []
    for fqn, p in art.linears.items():
        ref_w = independent_dequantize(p)
        module = QuantLinear((_broken_copy(p) if broken else p).to(device))
        for m in KERNEL_ROWS[kind]:
            x = torch.randn(m, p.in_features, generator=gen).to(dtype)
            with torch.no_grad():
                y = module(x.to(device)).double().cpu()
            ref = x.double() @ ref_w.t()
            if p.bias is not None:
                ref = ref + p.bias.double()
            err = kernel_error(y, ref)
            if err > worst:
                worst, worst_name = err, fqn
            if not err <= bound:
                failures.append(fqn)
        del module
    rows = "/".join(map(str, KERNEL_ROWS[kind]))
    path = "Triton" if kind == "cuda" else "reference"
    figure = (f"{len(art.linears)} linears x M={rows} ({path}, {str(dtype).split('.')[-1]}): max rel. error "
              f"{worst:.2e} ({worst_name}), bound {bound:.0e}")
    if failures:
        figure += f"; {len(set(failures))} over the bound: {', '.join(sorted(set(failures))[:3])}"
    return Check("kernels", "fail" if failures else "pass", figure)


# ---- 3. quality -----------------------------------------------------------------------------------------


def reference_quality(model, tokenizer) -> dict:
    """Perplexity of `model` (an HF causal LM, e.g. the dequantized one at quantize time) on QUALITY_PROTOCOL.

    The quantizer stores the result as manifest["verify_reference"]; `mpq verify` measures the artifact the same
    way and compares.
    """
    from mpq.calib.data import eval_windows
    from mpq.evaluate import perplexity

    windows = eval_windows(QUALITY_PROTOCOL["dataset"], tokenizer, QUALITY_PROTOCOL["windows"], QUALITY_PROTOCOL["seq_len"])
    device = next(model.parameters()).device
    ppl, _ = perplexity(model, windows.to(device))
    return dict(QUALITY_PROTOCOL, ppl=ppl)


def check_quality(art, path: Path, device: torch.device) -> Check:
    from mpq.dequantize import artifact_to_hf_model

    ref = art.manifest.get("verify_reference")
    tok = _tokenizer(path)
    if tok is None:
        return Check("quality", "n/a", "no tokenizer in the artifact")
    model = artifact_to_hf_model(art, torch.float32)
    if os.environ.get("MPQ_TEST_QUALITY_REGRESSION") == "1":
        gen = torch.Generator().manual_seed(0)
        for fqn in art.linears:
            w = model.get_submodule(fqn).weight.data
            w += 10.0 * w.std() * torch.randn(w.shape, generator=gen)
    got = reference_quality(model.to(device), tok)
    proto = f"{got['dataset']} {got['windows']}x{got['seq_len']}"
    if not isinstance(ref, dict) or not isinstance(ref.get("ppl"), (int, float)):
        return Check("quality", "n/a", f"ppl {got['ppl']:.3f} on {proto}; no figure recorded at quantize time")
    if any(ref.get(k) != got[k] for k in QUALITY_PROTOCOL):
        return Check("quality", "n/a", f"ppl {got['ppl']:.3f} on {proto}; recorded figure uses another protocol")
    limit = float(ref["ppl"]) * (1 + QUALITY_TOLERANCE)
    ok = got["ppl"] <= limit
    return Check("quality", "pass" if ok else "fail",
                 f"ppl {got['ppl']:.3f} vs {float(ref['ppl']):.3f} recorded on {proto} (limit {limit:.3f}, +{QUALITY_TOLERANCE:.0%})")


# ---- 4. predictors --------------------------------------------------------------------------------------


AGREEMENT_PROMPTS, AGREEMENT_PROMPT_LEN, AGREEMENT_NEW_TOKENS = 2, 32, 16
AGREEMENT_TOLERANCE = 0.05  # a few dozen tokens: allow this much below the rate recorded at training


def recorded_agreement(meta: dict) -> float | None:
    """The simulated greedy agreement of the chosen thresholds, as `train-predictors` recorded it."""
    pred = meta.get("predictors") or {}
    for row in pred.get("sweep") or []:
        if row.get("precision") == pred.get("chosen_precision"):
            return float(row["agreement"])
    return None


def exit_agreement(path: Path, device: torch.device) -> float:
    """Teacher-forced greedy agreement of exit decoding with full-depth decoding on the first Hamlet prompts."""
    from mpq.calib.data import eval_windows
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.decode import ExitDecoder

    engine = load_engine(str(path), str(device))
    prompts = eval_windows("shakespeare:hamlet", engine.tokenizer, AGREEMENT_PROMPTS, AGREEMENT_PROMPT_LEN + AGREEMENT_NEW_TOKENS)
    spec = load_specee(path, engine.config)
    same = total = 0
    for row in prompts.tolist():
        prompt, n = row[:AGREEMENT_PROMPT_LEN], AGREEMENT_NEW_TOKENS
        full, _, _ = ExitDecoder(engine.model, None, len(row) + 1, exits=False).generate(prompt, n)
        with_exits, _, _ = ExitDecoder(engine.model, spec, len(row) + 1, auto_fallback=False).generate(prompt, n, force=full)
        same += sum(a == b for a, b in zip(full, with_exits))
        total += len(full)
    return same / total


def check_predictors(art, path: Path, device: torch.device) -> Check:
    if not art.extras:
        return Check("predictors", "n/a", "no specee.* tensors")
    meta = art.manifest.get("specee")
    if not isinstance(meta, dict):
        return Check("predictors", "fail", f"{len(art.extras)} specee.* tensors but no 'specee' manifest entry")
    bad = sorted(n for n, t in art.extras.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        return Check("predictors", "fail", f"non-finite values in {', '.join(bad[:3])}")
    recorded = recorded_agreement(meta)
    if recorded is None:
        return Check("predictors", "fail", "no agreement rate recorded by train-predictors")
    try:
        agreement = exit_agreement(path, device)
    except MpqError as e:
        return Check("predictors", "fail", f"predictors do not load: {e}")
    ok = agreement >= recorded - AGREEMENT_TOLERANCE
    return Check("predictors", "pass" if ok else "fail",
                 f"exit decoding agrees with full depth on {100 * agreement:.1f}% of greedy tokens "
                 f"(recorded {100 * recorded:.1f}%, tolerance {100 * AGREEMENT_TOLERANCE:.0f} points)")


# ---- the command ------------------------------------------------------------------------------------------


def verify(path: Path | str, device: str = "auto") -> dict:
    """Run every check; later checks are skipped (and fail) when integrity fails. Returns a JSON-able dict."""
    from mpq.devices import resolve_device

    path = Path(path).expanduser()
    dev = resolve_device(device)
    if not path.is_dir():
        raise MpqError(f"artifact folder not found: {path}")
    integrity, art = check_integrity(path)
    checks = [integrity]
    if art is None:
        checks += [Check(n, "skipped", "integrity failed") for n in ("kernels", "quality", "predictors")]
    else:
        for name, fn in (("kernels", lambda: check_kernels(art, dev)), ("quality", lambda: check_quality(art, path, dev)),
                         ("predictors", lambda: check_predictors(art, path, dev))):
            try:
                checks.append(fn())
            except ArtifactError as e:
                checks.append(Check(name, "fail", str(e)))
    return {"artifact": str(path), "device": str(dev), "passed": not any(c.failed for c in checks),
            "checks": [asdict(c) for c in checks]}
