"""Serving a trained run: requests/s and p50/p99 latency of single-user top-10 requests to a
live `iisan serve` (loopback, keep-alive HTTP, known users drawn at random), with one client
and with four at once, exact top-K and through the faiss index; and the index's recall@10
against the exact top-10 of every test user, with its time per query.

    .venv/bin/python benchmarks/serve.py --run results/scientific_titles/text_only_minilm [--requests 2000]

The run is any trained run folder; the README's figures use the Scientific text-only
MiniLM run of the `scientific_text` target.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run: str, index: str | None) -> tuple[subprocess.Popen, int]:
    port = _port()
    cmd = [sys.executable, "-m", "iisan", "serve", "--run", run, "--port", str(port)]
    p = subprocess.Popen(cmd + (["--index", index] if index else []), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return p, port
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise SystemExit("the server did not start")


def _client(port: int, users: list[str], n: int, seed: int, out: list[float]) -> None:
    rng = random.Random(seed)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("GET", f"/users/{rng.choice(users)}/recommendations?k=10")
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}")
        out.append(time.perf_counter() - t0)


def _load(port: int, users: list[str], n: int, clients: int) -> dict:
    _client(port, users, 50, 99, [])  # warm-up
    lat: list[list[float]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=_client, args=(port, users, n // clients, i, lat[i])) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = sorted(x for xs in lat for x in xs)
    q = statistics.quantiles(flat, n=100)
    return {"clients": clients, "requests": len(flat), "requests_per_s": len(flat) / wall,
            "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--requests", type=int, default=2000)
    a = ap.parse_args()
    from iisan.use.recommend import export_embeddings, read_sequences
    from iisan.use.trained import load_run

    _, data, _ = load_run(a.run)
    users = [u for u, _ in read_sequences(data)]
    emb = Path(tempfile.mkdtemp(prefix="iisan-serve-"))
    info = export_embeddings(a.run, emb, index="faiss")["index"]
    print(json.dumps({"index": info}))
    rows = []
    for label, index in (("exact", None), ("faiss", str(emb / "items.faiss"))):
        p, port = _start(a.run, index)
        try:
            for clients in (1, 4):
                row = {"search": label, **_load(port, users, a.requests, clients)}
                print(json.dumps(row))
                rows.append(row)
        finally:
            p.terminate()
            p.wait()
    print(f"\nindex: {info['n_items']:,} items, recall@10 {info['recall@10']:.4f} against the exact top-10 of "
          f"{info['users']:,} test users, {info['ms_per_query']:.3f} ms a query, efSearch "
          f"{info['efSearch']}")  # fmt: skip
    print("\n| search | clients | requests/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['search']} | {r['clients']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    print(f"# reproduce: .venv/bin/python benchmarks/serve.py --run {a.run} --requests {a.requests}")


if __name__ == "__main__":
    main()
