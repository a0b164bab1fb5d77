"""The loss-gradient energy of every decoder linear's output, g[r] = E[(dL/dy_r)^2] per output row, on calibration
windows (one whole-model backward per window; the weights get no gradients).

Why: the Hessian X^T X says how much a weight error moves a linear's *output*. It does not say how much that output
moves the *loss*, and the linears differ by orders of magnitude there: on SmolLM2 the first layer's v/o
projections carry ~1000x the gradient energy of the last layers'. To second order, a weight error dW of row r
costs about 1/2 g[r] dW_r H dW_r^T of loss, so the allocator weights each linear's error table by g
(recipe `allocation: fisher`), row by row, which also decides which row tiles get 4 bits. On SmolLM2 it took Hamlet
from 1.71x to 1.47x the float perplexity at 3.0 b/w, and from 2.26x to 1.84x at 2.5 (runs with fp32 gradients of 32
windows; README has the sweep).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mpq.errors import ArtifactError

FISHER_FILE = "fisher.safetensors"


def output_gradient_energy(model, windows: torch.Tensor, device: torch.device, progress=None) -> dict[str, torch.Tensor]:
    """{fqn: g [out_features] fp32} for the nn.Linear modules under model.model.layers, from the mean LM loss of each
    window [S] of `windows` [n, S]; the model runs on `device` in its own dtype."""
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    sums: dict[str, torch.Tensor] = {}
    tokens = 0

    def hook(name):
        def fn(_module, _grad_in, grad_out):
            g = grad_out[0].detach().float()
            s = g.pow(2).reshape(-1, g.shape[-1]).sum(0)
            sums[name] = s if name not in sums else sums[name] + s
        return fn

    handles = [m.register_full_backward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]
    try:
        for i in range(windows.shape[0]):
            ids = windows[i: i + 1].to(device)
            emb = model.model.embed_tokens(ids).detach().requires_grad_(True)  # the graph starts here
            model(inputs_embeds=emb, labels=ids, use_cache=False).loss.backward()
            tokens += ids.shape[1]
            if progress is not None:
                progress(i)
    finally:
        for h in handles:
            h.remove()
    return {name: (s / tokens).cpu() for name, s in sums.items()}


def load_fisher(folder: Path | str | None, shapes: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """The calibration's gradient energies for the linears in `shapes` ({fqn: out_features}), validated; None where
    the folder has none (made with --fisher-samples 0, or before mpq 0.3)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if folder is None or not (Path(folder) / FISHER_FILE).exists():
        return None
    try:
        raw = load_file(str(Path(folder) / FISHER_FILE))
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"{FISHER_FILE}: {str(e)[:120]}") from None
    for name, n in shapes.items():
        g = raw.get(name)
        if g is None or g.dim() != 1 or g.numel() != n or not torch.isfinite(g).all() or (g < 0).any():
            raise ArtifactError(f"{FISHER_FILE}: missing or malformed entry for {name}")
    return {name: raw[name].float() for name in shapes}
