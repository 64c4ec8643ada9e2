"""scripts/gpu-check, end to end on the CPU with tiny sizes, so the GPU check cannot rot."""

import json

from conftest import REPO


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    import subprocess

    out = tmp_path / "gpu-check.json"
    r = subprocess.run([str(REPO / "scripts/gpu-check"), "--cpu", "--out", str(out), "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["cuda tests"]["status"] == "skipped (no GPU)"
    streamed = res["extract, 2 layers streamed"]
    assert streamed["status"] == "ok" and streamed["layers_streamed"] == 2 and streamed["streamed_mib"] > 0
    assert streamed["streamed_mib"] == streamed["planned_mib"]  # the bytes that moved are the ones planned
    assert res["extract, resident"]["same_bytes_as_streamed"] is True
    assert res["training twice, same seed"]["same_weights_and_ranks"] is True
    assert "iisan GPU check on cpu" in r.stdout and "rerun: scripts/gpu-check --cpu" in r.stdout
