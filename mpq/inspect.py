"""`mpq inspect`: an artifact's provenance and plan, read from its manifest alone (no tensor is loaded)."""

from __future__ import annotations

from pathlib import Path

from mpq.artifact import read_manifest

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def artifact_info(path: Path) -> dict:
    config, manifest, _ = read_manifest(Path(path))
    keys = ("source_model", "tool", "source", "calibration", "recipe", "recipe_source", "allocation_used", "overrides",
            "bits_per_weight", "gate", "verify_reference", "quantize_seconds", "float_linears", "format_version",
            "quant_version", "specee")
    info = {k: manifest.get(k) for k in keys if k in manifest}
    info["plan"] = manifest.get("plan")
    info["quantization_config"] = config.get("quantization_config")
    return info


def allocation_grid(plan: dict) -> tuple[list[list[float]], list[list[float]]]:
    """[layer][module] 4-bit fraction and outliers per weight, from the stored plan."""
    rows = plan["linears"]
    layers = 1 + max(int(r["name"].split(".")[2]) for r in rows)
    frac = [[0.0] * len(MODULES) for _ in range(layers)]
    outl = [[0.0] * len(MODULES) for _ in range(layers)]
    for r in rows:
        i, j = int(r["name"].split(".")[2]), MODULES.index(r["name"].rsplit(".", 1)[1])
        k = r["shape"][1]
        groups = r.get("groups") or k // (128 if k % 128 == 0 else 64)  # plans before the field: the default rule
        if r["pinned"] == 16:
            frac[i][j], outl[i][j] = float("nan"), 0.0
            continue
        frac[i][j] = r["n4"] / groups
        outl[i][j] = r["outliers"] * (groups - r["n4"]) / k  # outliers per weight of the row
    return frac, outl


def print_info(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="mpq artifact", show_header=False, title_justify="left")
    tool = info.get("tool") or {}
    calib = info.get("calibration") or {}
    gate = info.get("gate") or {}
    rows = [
        ("source model", str(info.get("source_model"))),
        ("format / quant version", f"v{info.get('format_version')} / v{info.get('quant_version')}"),
        ("bits/weight (all-in)", f"{info.get('bits_per_weight', float('nan')):.4f}"),
        ("tool", f"mpq {tool.get('mpq')} @ {tool.get('commit')}; torch {tool.get('torch')}, transformers {tool.get('transformers')}, triton {tool.get('triton')}"),
        ("source hashes", f"config {str((info.get('source') or {}).get('config_sha256'))[:16]}, weights {str((info.get('source') or {}).get('weights_sha256'))[:16]}"),
        ("calibration", "none (data-free)" if not calib else f"{calib.get('dataset')}, {calib.get('samples')} x {calib.get('seq_len')}, seed {calib.get('seed')}"),
        ("recipe", f"{(info.get('recipe') or {}).get('name')} ({info.get('recipe_source') or 'built-in'}), "
                   f"allocation {info.get('allocation_used') or (info.get('recipe') or {}).get('allocation')}"),
        ("overrides", str(info.get("overrides") or {})),
        ("quality gate", "not run" if not gate else f"ppl x{gate.get('ppl_ratio', float('nan')):.3f} (limit x{gate.get('max_ppl_ratio')}) {'passed' if gate.get('passed') else 'FAILED (forced)'}"),
        ("predictors", "present" if info.get("specee") else "none"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def plot_allocation(info: dict, path: Path) -> None:
    """Heatmaps (decoder layers x linear modules) of the 4-bit fraction and the outlier density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac, outl = allocation_grid(info["plan"])
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 0.22 * len(frac) + 1.8), sharey=True)
    for ax, data, title, cmap in ((axes[0], frac, "4-bit tile fraction", "viridis"),
                                  (axes[1], [[v * 1000 for v in r] for r in outl], "fp16 outliers per 1000 weights", "magma")):
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(MODULES)), [m.replace("_proj", "") for m in MODULES], rotation=45)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0].set_ylabel("decoder layer")
    fig.suptitle(f"{info.get('source_model')}: {info.get('bits_per_weight', 0):.3f} bits/weight", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
