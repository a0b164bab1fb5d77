"""`mpq calibrate`: GPTQ-style sequential capture of every linear's input Hessian X^T X, layer by layer.

Only one decoder layer sits on the compute device at a time; the hidden states of all windows stay on
the host. Each finished layer is written as `layer_NNN.safetensors` (atomically); the hidden states
are checkpointed at most once a minute, so an interrupted run resumes from the last checkpoint. A job
file records a fingerprint of model, data and settings, and a resume with other inputs is refused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpq.artifact import atomic_save_tensors, atomic_write_text
from mpq.devices import resolve_device
from mpq.errors import ArtifactError, MpqError

JOB_FILE = "calibration.json"
HIDDEN_FILE = "hidden.safetensors"
CALIB_VERSION = 1
CHECKPOINT_SECONDS = 60.0  # MPQ_CHECKPOINT_SECONDS overrides it (tests checkpoint every layer)
# Layers run in bf16 (AMX/tensor cores: ~6x the fp32 rate on the CPUs here); Hessians are summed in fp32.
CAPTURE_DTYPE = torch.bfloat16
# Linears that read the same input share one Hessian.
INPUT_GROUPS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out_in": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "down_in": ("mlp.down_proj",),
}


@dataclass
class CalibrationConfig:
    model: str
    dataset: str = "shakespeare"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    out: Path = Path("calib")
    device: str = "auto"
    trust_remote_code: bool = False
    batch_size: int = 8
    fisher_samples: int = 32  # windows for the loss-gradient pass (mpq/calib/fisher.py); 0 skips it


def estimate_memory(config, samples: int, seq_len: int) -> tuple[float, float]:
    """(host GB, device GB) peak estimate: hidden states of all windows + one layer + its Hessians."""
    d, f = config.hidden_size, config.intermediate_size
    hidden = samples * seq_len * d * 4 * 2  # inputs and outputs of the current layer
    layer = (4 * d * d + 3 * d * f) * 4
    hessians = (3 * d * d + f * f) * 4
    act = 8 * seq_len * max(f, d) * 4 * 4
    return (hidden + 2 * layer) / 1e9 + 1.0, (layer + hessians + act + hidden / samples * 8) / 1e9


def check_memory(host_gb: float, device_gb: float, device: torch.device) -> None:
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (ValueError, OSError):
        avail = float("inf")
    if host_gb > avail:
        raise MpqError(f"this needs about {host_gb:.1f} GB of host RAM, {avail:.1f} GB free: lower --samples or --seq-len, or use a larger machine")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info()[0] / 1e9
        if device_gb > free:
            raise MpqError(f"calibration needs about {device_gb:.1f} GB on the GPU, {free:.1f} GB free: lower --samples / --seq-len, or use --device cpu")


def read_calibration(folder: Path) -> dict:
    """The finished calibration's job record; refuses missing, unfinished or foreign folders."""
    folder = Path(folder)
    try:
        job = json.loads((folder / JOB_FILE).read_text())
    except (OSError, ValueError):
        raise MpqError(f"not a calibration folder (no readable {JOB_FILE}): {folder}") from None
    if not isinstance(job, dict) or job.get("version") != CALIB_VERSION:
        raise ArtifactError(f"calibration folder of an unknown version: {folder}")
    if not job.get("complete"):
        raise MpqError(f"calibration in {folder} is unfinished: rerun `mpq calibrate` with the same options to resume")
    return job


def load_layer_hessians(folder: Path, layer: int) -> dict[str, torch.Tensor]:
    """{linear suffix (e.g. 'self_attn.q_proj'): H [K, K] = X^T X / tokens} for one decoder layer."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(Path(folder) / f"layer_{layer:03d}.safetensors"))
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"calibration layer {layer}: {str(e)[:120]}") from None
    out = {}
    for key, lins in INPUT_GROUPS.items():
        h = raw.get(key)
        if h is None or h.dim() != 2 or h.shape[0] != h.shape[1] or not torch.isfinite(h).all():
            raise ArtifactError(f"calibration layer {layer}: missing or malformed Hessian '{key}'")
        for lin in lins:
            out[lin] = h
    return out


class _HessianHooks:
    """Accumulate X^T X of each input group of one decoder layer."""

    def __init__(self, layer: torch.nn.Module, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.handles = []
        for key, lins in INPUT_GROUPS.items():
            mod = layer.get_submodule(lins[0])
            self.handles.append(mod.register_forward_pre_hook(self._hook(key)))

    def _hook(self, key):
        def fn(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if key == "attn_in":
                self.tokens += x.shape[0]
            h = (x.T @ x).float()  # one batch in the compute dtype, the running sum in fp32
            self.sums[key] = h if key not in self.sums else self.sums[key] + h
        return fn

    def finish(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {k: (v / max(self.tokens, 1)).cpu() for k, v in self.sums.items()}


def _layer_forward(layer, hidden: torch.Tensor, rotary, device: torch.device) -> torch.Tensor:
    pos = torch.arange(hidden.shape[1], device=device).unsqueeze(0).expand(hidden.shape[0], -1)
    h = hidden.to(device)
    cos_sin = rotary(h, pos)
    out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin, use_cache=False)
    return (out[0] if isinstance(out, tuple) else out).cpu()



def calibrate(cfg: CalibrationConfig, progress=None) -> Path:
    from mpq.calib.data import dataset_fingerprint, load_token_windows
    from mpq.models import config_fingerprint, load_config, load_float_model, load_tokenizer, resolve_model
    from mpq.progress import layer_progress

    if cfg.samples <= 0 or cfg.seq_len <= 1:
        raise MpqError("--samples must be positive and --seq-len at least 2")
    if cfg.fisher_samples < 0:
        raise MpqError("--fisher-samples must be 0 (skip the loss-gradient pass) or positive")
    device = resolve_device(cfg.device)
    src = resolve_model(cfg.model)
    config = load_config(src, cfg.trust_remote_code)
    host_gb, dev_gb = estimate_memory(config, cfg.samples, cfg.seq_len)
    print(f"memory estimate: {host_gb:.1f} GB host, {dev_gb:.1f} GB on {device.type}")
    check_memory(host_gb, dev_gb, device)
    tokenizer = load_tokenizer(src, cfg.trust_remote_code)
    windows = load_token_windows(cfg.dataset, tokenizer, cfg.samples, cfg.seq_len, cfg.seed)
    fingerprint = {"model": cfg.model, "config": config_fingerprint(config), "dataset": cfg.dataset,
                   "data": dataset_fingerprint(cfg.dataset),
                   "samples": cfg.samples, "seq_len": cfg.seq_len, "seed": cfg.seed, "dtype": str(CAPTURE_DTYPE)}
    out = Path(cfg.out)
    created, fresh = not out.exists(), not (out / JOB_FILE).exists()
    job = _open_job(out, fingerprint, config.num_hidden_layers)
    if job.get("complete"):
        _ensure_fisher(out, cfg, windows, device, lambda: load_float_model(src, CAPTURE_DTYPE, cfg.trust_remote_code))
        return out
    try:
        model = load_float_model(src, CAPTURE_DTYPE, cfg.trust_remote_code)
    except BaseException:
        if fresh:  # unreadable weights (or a stop) before any work: leave no trace of this run
            (out / JOB_FILE).unlink(missing_ok=True)
            if created:
                out.rmdir()
        raise
    layers = model.model.layers
    if job["next_layer"] == 0:
        with torch.no_grad():
            hidden = model.model.embed_tokens(windows)
    else:
        hidden = _load_hidden(out, job)
    rotary = model.model.rotary_emb.to(device)
    last_save = time.monotonic()
    with layer_progress(len(layers), "calibrate", start=job["next_layer"]) as advance, torch.no_grad():
        for i in range(job["next_layer"], len(layers)):
            layer = layers[i].to(device)
            hooks = _HessianHooks(layer, device)
            outs = [_layer_forward(layer, hidden[b: b + cfg.batch_size], rotary, device)
                    for b in range(0, hidden.shape[0], cfg.batch_size)]
            atomic_save_tensors(out / f"layer_{i:03d}.safetensors", hooks.finish())
            layers[i] = layer.to("cpu")
            hidden = torch.cat(outs)
            job["next_layer"] = i + 1
            every = float(os.environ.get("MPQ_CHECKPOINT_SECONDS", CHECKPOINT_SECONDS))
            if time.monotonic() - last_save >= every or i + 1 == len(layers):
                # the checkpoint names its own layer, so a stop between these two writes still resumes
                atomic_save_tensors(out / HIDDEN_FILE, {"hidden": hidden}, metadata={"layer": str(i + 1)})
                job["hidden_layer"] = i + 1
                atomic_write_text(out / JOB_FILE, json.dumps(job, indent=1))
                last_save = time.monotonic()
            advance(i)
    job["complete"] = True
    atomic_write_text(out / JOB_FILE, json.dumps(job, indent=1))
    (out / HIDDEN_FILE).unlink(missing_ok=True)
    del hidden
    _ensure_fisher(out, cfg, windows, device, lambda: model)
    return out


def _ensure_fisher(out: Path, cfg: CalibrationConfig, windows: torch.Tensor, device: torch.device, get_model) -> None:
    """Write the loss-gradient energies (fisher.safetensors) unless present for the same windows. A separate,
    restartable stage after the Hessians: a calibration made without it gains it by rerunning `mpq calibrate`."""
    from safetensors import safe_open

    from mpq.calib.fisher import FISHER_FILE, output_gradient_energy
    from mpq.progress import layer_progress

    n = min(cfg.fisher_samples, windows.shape[0])
    path = out / FISHER_FILE
    if n <= 0:
        return
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("windows") == str(n):
                    return
        except Exception:
            pass  # unreadable: computed again below
    model = get_model()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    run_on = device
    if device.type == "cuda" and torch.cuda.mem_get_info()[0] < 1.5 * params + 2e9:
        print("loss gradients: the whole model does not fit on the GPU; running them on the CPU")
        run_on = torch.device("cpu")
    with layer_progress(n, "loss gradients", unit="window") as advance:
        energy = output_gradient_energy(model, windows[:n], run_on, advance)
    model.to("cpu")
    atomic_save_tensors(path, energy, metadata={"windows": str(n), "seq_len": str(windows.shape[1])})


def _open_job(out: Path, fingerprint: dict, num_layers: int) -> dict:
    path = out / JOB_FILE
    if path.exists():
        try:
            job = json.loads(path.read_text())
        except ValueError:
            raise ArtifactError(f"{path} is corrupted; delete the folder to start over") from None
        if job.get("invalid"):
            raise ArtifactError(f"{path}: interrupted during a checkpoint swap; delete the folder to start over")
        if job.get("fingerprint") != fingerprint:
            raise MpqError(f"{out} holds a calibration of other inputs (model, data or settings differ); choose another --out")
        if job.get("complete"):
            print(f"calibration in {out} is already complete")
        job["next_layer"] = _checkpoint_layer(out, job)
        if job["next_layer"]:
            print(f"resuming from layer {job['next_layer']}")
        return job
    if out.exists() and any(out.iterdir()):
        raise MpqError(f"output folder exists and is not a calibration of these inputs: {out}")
    out.mkdir(parents=True, exist_ok=True)
    job = {"version": CALIB_VERSION, "fingerprint": fingerprint, "num_layers": num_layers, "next_layer": 0,
           "hidden_layer": 0, "complete": False, "dataset": fingerprint["dataset"], "input_groups": {k: list(v) for k, v in INPUT_GROUPS.items()}}
    atomic_write_text(path, json.dumps(job, indent=1))
    return job


def _checkpoint_layer(out: Path, job: dict) -> int:
    """The layer the hidden-state checkpoint holds the input of (its own metadata wins over the job file)."""
    from safetensors import safe_open

    if job.get("complete") or not (out / HIDDEN_FILE).exists():
        return job.get("hidden_layer", 0)
    try:
        with safe_open(str(out / HIDDEN_FILE), framework="pt") as f:
            return int((f.metadata() or {})["layer"])
    except Exception:
        raise ArtifactError(f"{out}: hidden-state checkpoint unreadable; delete the folder to start over") from None


def _load_hidden(out: Path, job: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    try:
        return load_file(str(out / HIDDEN_FILE))["hidden"]
    except Exception:
        raise ArtifactError(f"{out}: hidden-state checkpoint unreadable; delete the folder to start over") from None
