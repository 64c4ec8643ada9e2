"""Serving a trained run: top-10 for every Scientific test user over all items, and the
chunked scorer on a generated 1,000,000-item catalogue.

1. `iisan recommend --k 10` on a trained text-only MiniLM run (default: the
   Scientific target's first run, built by
   `snakemake --cores 2 results/report/scientific_text/summary.json`), timed as a
   whole command (Python start, loading the checkpoint, the prepared data and the
   cache, scoring, writing the TSV); target < 10 s on 2 CPU cores. Peak memory is
   the child's peak RSS.
2. `recommend.top_k` with random item embeddings (1,000,000 items x 64) for
   --users users, in a child process: seconds and peak RSS above the resident size
   before scoring, against what one unchunked users x items score matrix would take.

    .venv/bin/python benchmarks/recommend.py [--run DIR] [--items 1000000] [--users 4096]
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "results/scientific/text_only_minilm/lr-0.001_seed-1"

CATALOGUE = """
import resource, sys, time, torch
from iisan.use.recommend import top_k
n_items, n_users, d = int(sys.argv[1]), int(sys.argv[2]), 64
g = torch.Generator().manual_seed(0)
items = torch.randn(n_items + 1, d, generator=g)
users = torch.randn(n_users, d, generator=g)
exclude = torch.randint(1, n_items + 1, (n_users, 12), generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
scores, ids = top_k(users, items, exclude, 10)
s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(s, (peak - base) / 1024, (ids > 0).all().item())
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(RUN), help="a trained run folder")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=4096)
    a = ap.parse_args()
    iisan = [str(Path(sys.executable).parent / "iisan")]
    if not (Path(a.run) / "model.pt").exists():
        sys.exit(f"no trained run at {a.run}: build it with "
                 "`snakemake --cores 2 results/report/scientific_text/summary.json` or pass --run")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "top10.tsv"
        t = time.perf_counter()
        subprocess.run([*iisan, "recommend", "--run", a.run, "--k", "10", "--out", str(out)], check=True)
        seconds = time.perf_counter() - t
        rows = sum(1 for _ in out.open()) - 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"iisan recommend, top-10: {rows // 10:,} users, {rows:,} rows in {seconds:.1f} s "
          f"(whole command, loading included), peak RSS {peak:.0f} MiB  [{a.run}]")  # fmt: skip

    r = subprocess.run([sys.executable, "-c", CATALOGUE, str(a.items), str(a.users)],
                       check=True, capture_output=True, text=True)  # fmt: skip
    seconds, mib, ok = r.stdout.split()
    full = a.users * (a.items + 1) * 4 / 2**20
    print(f"top_k over a generated catalogue: {a.items:,} items x {a.users:,} users, d=64: {float(seconds):.1f} s, "
          f"peak RSS above baseline {float(mib):.0f} MiB (one unchunked score matrix: {full:,.0f} MiB; "
          f"every user got 10 items: {ok})")  # fmt: skip
    print(f"reproduce: .venv/bin/python benchmarks/recommend.py --run {a.run} --items {a.items} --users {a.users}")


if __name__ == "__main__":
    main()
