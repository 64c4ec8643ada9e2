"""The report's figures (matplotlib, PNG). Each figure is always written (a note
when a target has nothing of its kind), so the report's outputs are fixed."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_PLOTS = ("hr_by_text_encoder.png", "time_memory_by_method.png", "cache_storage.png", "training_curves.png",
                "gates.png", "layerdrop_cost.png")  # fmt: skip


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _empty(path: Path, what: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"no {what} in this target", ha="center", va="center")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)


def _read(run_dir: Path, name: str):
    p = Path(run_dir) / name
    return json.loads(p.read_text()) if p.is_file() else None


def report_plots(out: Path, runs: list[dict], timed: list[dict], storage_rows: list, k: int) -> list[str]:
    """``timed``: the runs with training time to show (popularity has none)."""
    plt = _plt()
    path = out / "hr_by_text_encoder.png"
    scaling = sorted((r for r in runs if r["group"] == "scaling"), key=lambda r: (r["text_params_b"] or 0, r["label"]))
    if scaling:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for ds in sorted({r["dataset"] for r in scaling}):
            rs = [r for r in scaling if r["dataset"] == ds]
            ax.errorbar([r["label"] for r in rs], [100 * r["metrics"]["test"][f"HR@{k}"] for r in rs],
                        yerr=[100 * r["metrics"].get("sd", {}).get("test", {}).get(f"HR@{k}", 0) for r in rs],
                        marker="o", capsize=3, label=ds)  # fmt: skip
        ax.set_ylabel(f"test HR@{k} (%)")
        ax.set_title(f"HR@{k} by text encoder (mean ± sd over seeds)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
        _save(fig, path)
    else:
        _empty(path, "scaling experiments")

    path = out / "time_memory_by_method.png"
    if timed:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        labels = [f"{r['dataset']}/{r['label']}" for r in timed]
        axes[0].barh(labels, [r["eff"]["seconds_per_epoch"] for r in timed])
        axes[0].set_xlabel("training seconds per epoch")
        axes[1].barh(labels, [r["eff"]["peak_memory_bytes"] / 2**20 for r in timed])
        axes[1].set_xlabel(f"peak memory, MiB ({timed[0]['eff'].get('peak_memory_kind', '')})")
        axes[1].set_yticklabels([])
        _save(fig, path)
    else:
        _empty(path, "trained methods")

    path = out / "cache_storage.png"
    if storage_rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [f"{r[0]}/{r[1]}" for r in storage_rows]
        ax.barh(names, [r[4] for r in storage_rows], label="all layers")
        ax.barh(names, [r[3] for r in storage_rows], label="selected layers")
        ax.set_xlabel("cache size, MiB")
        ax.legend()
        _save(fig, path)
    else:
        _empty(path, "caches")

    _curves(out / "training_curves.png", runs, k)
    _gates(out / "gates.png", runs)
    _layerdrop_cost(out / "layerdrop_cost.png", timed)
    return list(REPORT_PLOTS)


def _curves(path: Path, runs: list[dict], k: int) -> None:
    plt = _plt()
    curves = []
    for r in runs:
        for i, d in enumerate(r["runs"]):
            history = (_read(d, "metrics.json") or {}).get("history") or []
            if history:
                curves.append((r, i, history))
    if not curves:
        _empty(path, "training curves")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colours = {}
    for r, i, history in curves:
        name = f"{r['dataset']}/{r['label']}"
        colour = colours.setdefault(name, f"C{len(colours) % 10}")
        evals = [h for h in history if f"valid_HR@{k}" in h]
        kw = {"color": colour, "alpha": 0.9 if i == 0 else 0.4, "label": name if i == 0 else None, "lw": 1.2}
        axes[0].plot([h["epoch"] for h in evals], [100 * h[f"valid_HR@{k}"] for h in evals], **kw)
        axes[1].plot([h["epoch"] for h in evals], [100 * h[f"valid_NDCG@{k}"] for h in evals], **kw)
        axes[2].plot([h["epoch"] for h in history], [h["loss"] for h in history], **kw)
    for ax, title in zip(axes, (f"valid HR@{k} (%)", f"valid NDCG@{k} (%)", "training loss"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
    axes[2].legend(fontsize=7, loc="upper right")
    _save(fig, path)


def _gates(path: Path, runs: list[dict]) -> None:
    plt = _plt()
    found = [(r, g) for r in runs if (g := _read(r["runs"][0], "gates.json"))]
    if not found:
        _empty(path, "learned gates")
        return
    cols = min(4, len(found))
    rows = -(-len(found) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (r, gates) in zip(axes.flat, found, strict=False):
        for tower, values in gates.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=tower)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_ylim(0, 1)
        ax.set_title(f"{r['dataset']}/{r['label']}", fontsize=9)
        ax.set_xlabel("block")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(found) :]:
        ax.axis("off")
    fig.suptitle("learned gates per tower (text/image: weight of the layer's state; inter: weight of the image)")
    _save(fig, path)


def layerdrop_pairs(timed: list[dict]) -> dict[tuple, dict]:
    """(dataset, text backbone, params) -> {"full": efficiency, "dropped": efficiency} of the cached
    IISAN runs of each text encoder run both ways (the first run of a kind stands for it)."""
    pairs: dict[tuple, dict] = {}
    for r in timed:
        if r["eff"].get("method") != "iisan" or not r.get("text_layers"):
            continue
        kind = "full" if r["text_layers"].startswith("all") else "dropped"
        pairs.setdefault((r["dataset"], r["text_backbone"], r["text_params_b"] or 0), {}).setdefault(kind, r["eff"])
    return {key: v for key, v in pairs.items() if set(v) == {"full", "dropped"}}


def _layerdrop_cost(path: Path, timed: list[dict]) -> None:
    """The paper's Figure 7: training time and memory of cached IISAN by text encoder, with every
    layer cached ("full") against LayerDrop's selection ("dropped")."""
    plt = _plt()
    bars = layerdrop_pairs(timed)
    if not bars:
        _empty(path, "text encoder with a full-layer and a LayerDrop run")
        return
    keys = sorted(bars, key=lambda key: (key[0], key[2], key[1]))
    names = [f"{ds}/{b}" if len({key[0] for key in keys}) > 1 else b for ds, b, _ in keys]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = range(len(keys))
    for offset, kind in ((-0.2, "full"), (0.2, "dropped")):
        effs = [bars[key].get(kind) for key in keys]
        axes[0].bar([i + offset for i in x], [e["seconds_per_epoch"] if e else 0 for e in effs], 0.4, label=kind)
        axes[1].bar([i + offset for i in x], [e["peak_memory_bytes"] / 2**20 if e else 0 for e in effs], 0.4,
                    label=kind)  # fmt: skip
    kinds = {e.get("peak_memory_kind", "") for v in bars.values() for e in v.values()}
    axes[0].set_ylabel("training seconds per epoch")
    axes[1].set_ylabel(f"peak memory, MiB ({', '.join(sorted(kinds))})")
    for ax in axes:
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.legend(fontsize=8)
    fig.suptitle("cached IISAN by text encoder: all layers cached (full) vs LayerDrop's (dropped)")
    _save(fig, path)


def batch_size_plot(path: Path, table: list[list]) -> None:
    """Seconds per epoch and peak memory against batch size, log axes, one line per method."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in dict.fromkeys((t[0], t[1], t[2]) for t in table):
        rows = sorted((t for t in table if (t[0], t[1], t[2]) == key), key=lambda t: t[3])
        label = key[2] if len({t[0] for t in table}) == 1 else f"{key[0]}/{key[2]}"
        axes[0].plot([t[3] for t in rows], [t[6] for t in rows], marker="o", label=label)
        axes[1].plot([t[3] for t in rows], [max(t[7], 1e-3) for t in rows], marker="o", label=label)
    kind = table[0][8] if table else ""
    axes[0].set_ylabel("training seconds per epoch")
    axes[1].set_ylabel("peak memory, MiB")
    axes[1].set_title("CUDA allocator peak" if kind.startswith("cuda") else
                      "peak RSS above the process's size before training", fontsize=9)  # fmt: skip
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
    axes[0].legend(fontsize=8)
    _save(fig, path)
