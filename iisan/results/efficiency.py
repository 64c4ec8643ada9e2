"""TPME, the paper's training-efficiency score (method.md section 6)."""

from __future__ import annotations

TPME_WEIGHTS = (0.45, 0.1, 0.45)  # time, parameters, memory


def tpme(rows: dict[str, dict], weights=TPME_WEIGHTS) -> dict[str, float]:
    """TPME = a1*t + a2*p + a3*m, each min-max normalised over the compared methods.

    rows: method -> {"seconds_per_epoch", "trainable_parameters", "peak_memory_bytes"}.
    Lower is better; a column with one distinct value contributes 0."""
    keys = ("seconds_per_epoch", "trainable_parameters", "peak_memory_bytes")

    def norm(key):
        vals = {m: float(r[key]) for m, r in rows.items()}
        lo, hi = min(vals.values()), max(vals.values())
        return {m: (v - lo) / (hi - lo) if hi > lo else 0.0 for m, v in vals.items()}

    cols = [norm(k) for k in keys]
    return {m: sum(w * c[m] for w, c in zip(weights, cols, strict=True)) for m in rows}
