"""The Snakemake DAG on the demo: a real run, the quality orderings it must show,
and which stages rerun after each kind of change (dry runs)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from iisan.core.device import resolve_device
from iisan.core.measure import PeakMemory

from conftest import REPO, merged_config

pytestmark = pytest.mark.slow

SCENARIO = ".test/demo-small/config.yaml"  # a smaller demo than the README's, same code path
TARGET = yaml.safe_load((REPO / SCENARIO).read_text())["targets"]["demo"]["experiments"]


def snakemake(workdir, *args, overlays=(), check=True, scenario=SCENARIO):
    files = ["config.yaml", scenario, *overlays]
    env = dict(os.environ, PYTHONPATH=str(workdir))  # the copied package: code edits there count
    env["PATH"] = "/usr/bin:/bin"  # as after `.venv/bin/snakemake` with no venv activated: the Snakefile must cope
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "--configfile", *files, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r.stdout + r.stderr


def job_counts(out: str) -> dict:
    """The 'Job stats' table of a dry run: {rule: count}."""
    if "Nothing to be done" in out:
        return {}
    lines = out.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def overlay(workdir, name, data):
    (workdir / name).write_text(yaml.safe_dump(data))
    return name


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    for item in ("config.yaml", "workflow", "iisan", "envs", ".test"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / item)
    out = snakemake(wd, "--cores", "2")
    return wd, out


@pytest.fixture(scope="module")
def scenario():
    """The demo-small config as Snakemake sees it: config.yaml with the scenario over it."""
    from iisan.pipeline.config import validate

    return validate(merged_config(REPO / SCENARIO))


def runs_of(scenario, exp):
    from iisan.pipeline.runs import experiment_runs

    return experiment_runs(scenario, "demo", exp)


def metric(wd, exp):
    return json.loads((wd / "results/demo" / exp / "metrics.json").read_text())["test"]["HR@10"]


def test_demo_dag_produces_report_tables_and_plots(demo_run, scenario):
    wd, _ = demo_run
    rep = wd / "results/report/demo"
    for f in (
        "main.md",
        "main.csv",
        "scaling.md",
        "ablation.md",
        "efficiency.md",
        "efficiency.csv",
        "storage.md",
        "grid.csv",
        "hr_by_text_encoder.png",
        "time_memory_by_method.png",
        "cache_storage.png",
        "training_curves.png",
        "gates.png",
        "layerdrop_cost.png",
        "layers.md",
        "reproduction.md",
        "reproduction.csv",
    ):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    # the paper beside the demo: every published row listed, none of them run here; the column present, empty
    from iisan.results import paper

    rows = (rep / "reproduction.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 * len(paper.rows()) and not any(",measured," in r for r in rows)
    main = (rep / "main.md").read_text().splitlines()
    assert "paper HR@10 / NDCG@10 (%)" in main[2] and all("|  |  |" in r for r in main[4:] if "| demo |" in r)
    assert "IISAN-VS (tiny BERT+ViT)" in (rep / "main.md").read_text()
    assert "tiny-llama-gptq/even6" in (rep / "storage.md").read_text()
    # what bounds extraction is recorded with the cache (the GPTQ model is offloaded to disk)
    # the extraction logs hold iisan's lines and genuine warnings, not gptqmodel's import noise
    logs = list((wd / "results/logs/demo/cache").rglob("*.log"))
    assert len(logs) >= 6 and not [f for f in logs if "torchao" in f.read_text() or "triton" in f.read_text()]
    stats = json.loads((wd / "results/demo/cache/tiny-llama-gptq/even6.done").read_text())["stats"]["shards"][0]
    assert stats["items_per_s"] > 0 and 0 <= stats["padding_share"] < 0.5 and stats["batch_size"] == 64
    assert stats["streamed_weight_bytes_per_item"] > 0 and stats["layers_streamed"] == 17
    assert stats["peak_memory_kind"] == PeakMemory(resolve_device("auto")).kind
    for exp in TARGET:
        for f in ("metrics.json", "efficiency.json"):
            assert (wd / "results/demo" / exp / f).is_file()
        for run in runs_of(scenario, exp):
            assert (wd / "results/demo" / exp / run.name / "ranks.npz").is_file()
            assert (wd / "results/logs/demo" / exp / run.name / "train.log").is_file()
            assert (wd / "results/benchmarks/demo" / exp / run.name / "train.tsv").is_file()


def test_seeds_are_aggregated_and_the_grid_selected_on_validation(demo_run, scenario):
    wd, _ = demo_run
    m = json.loads((wd / "results/demo/vs_tiny/metrics.json").read_text())
    assert m["seeds"] == [1, 2] and len(m["per_seed"]) == 2 and m["per_seed"][0]["test"] != m["per_seed"][1]["test"]
    assert m["test"]["HR@10"] == pytest.approx(sum(s["test"]["HR@10"] for s in m["per_seed"]) / 2)
    g = json.loads((wd / "results/demo/text_only_tiny/metrics.json").read_text())
    assert [p["point"] for p in g["grid"]] == [{"lr": 0.001}, {"lr": 0.002}]
    chosen = max(g["grid"], key=lambda p: p["valid"]["HR@10"])
    assert g["selected_point"] == chosen["point"] and g["test"] == chosen["test"]
    main = (wd / "results/report/demo/main.md").read_text()
    assert " ± " in main and "* |" in main  # mean ± sd, and the best of the table marked significant
    assert len((wd / "results/report/demo/grid.csv").read_text().splitlines()) == 3


def test_demo_quality_orderings(demo_run):
    wd, _ = demo_run
    hr = {e: metric(wd, e) for e in TARGET}
    for full in ("vs_tiny", "va_tiny_llama_gptq"):
        for floor in ("popularity", "frozen_tiny"):
            assert hr[full] >= 1.5 * hr[floor] and hr[full] >= hr[floor] + 0.03, hr
        for single in ("text_only_tiny", "image_only_tiny"):
            assert hr[full] > hr[single] + 0.03, hr
    for single in ("text_only_tiny", "image_only_tiny"):
        assert hr[single] > hr["popularity"], hr


def test_nothing_reruns_without_a_change(demo_run):
    wd, _ = demo_run
    assert job_counts(snakemake(wd, "-n", "--cores", "1")) == {}


def test_training_setting_reruns_training_and_report_only(demo_run, scenario):
    wd, _ = demo_run
    ov = overlay(wd, "lr.yaml", {"datasets": {"demo": {"train": {"lr_san": 1.0e-3}}}})
    counts = job_counts(snakemake(wd, "-n", "--cores", "1", overlays=[ov]))
    n_runs = sum(len(runs_of(scenario, e)) for e in TARGET)
    assert counts == {"train_run": n_runs, "aggregate": len(TARGET), "report": 1, "all": 1}


def test_layer_selection_reruns_that_extraction_and_its_dependants(demo_run, scenario):
    wd, _ = demo_run
    ov = overlay(
        wd, "layers.yaml", {"experiments": {"vs_tiny": {"text": {"backbone": "tiny-bert", "layers": {"n": 3}}}}}
    )
    out = snakemake(wd, "-n", "--cores", "1", overlays=[ov])
    assert job_counts(out) == {
        "extract_shard": 1,
        "cache_verify": 1,
        "train_run": len(runs_of(scenario, "vs_tiny")),
        "aggregate": 1,
        "report": 1,
        "all": 1,
    }
    assert "results/demo/cache/tiny-bert/even3.done" in out


def _edit(path):
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    return original


def test_code_change_reruns_the_stages_that_use_it(demo_run, scenario):
    wd, _ = demo_run
    train_py = wd / "iisan/train/loop.py"
    original = _edit(train_py)
    try:
        counts = job_counts(snakemake(wd, "-n", "--cores", "1"))
    finally:
        train_py.write_text(original)
    n_runs = sum(len(runs_of(scenario, e)) for e in TARGET)
    assert counts == {"train_run": n_runs, "aggregate": len(TARGET), "report": 1, "all": 1}
    extract_py = wd / "iisan/extract/extraction.py"
    original = _edit(extract_py)
    try:
        counts = job_counts(snakemake(wd, "-n", "--cores", "1"))
    finally:
        extract_py.write_text(original)
    # three caches (tiny-bert, tiny-vit, tiny-llama-gptq) and everything trained on them
    cached = [e for e in TARGET if e != "popularity"]
    n_runs = sum(len(runs_of(scenario, e)) for e in cached)
    assert counts == {
        "extract_shard": 3,
        "cache_verify": 3,
        "train_run": n_runs,
        "aggregate": len(cached),
        "report": 1,
        "all": 1,
    }


def test_llama3_70b_target_dry_run_and_slurm_profile(demo_run):
    wd, _ = demo_run
    target = "results/scientific/va_llama3_70b/metrics.json"
    paper = ".test/paper-dryrun/config.yaml"
    out = snakemake(wd, "-n", "--cores", "1", target, scenario=paper)
    assert job_counts(out) == {"prepare": 1, "cache_init": 1, "extract_shard": 5, "cache_verify": 2, "train": 1}
    assert "results/scientific/cache/llama3-70b-gptq/even6.shards/3-of-4.done" in out
    out = snakemake(wd, "-n", "--profile", "workflow/profiles/slurm", target, scenario=paper)
    assert "gpu=1" in out and "runtime=720" in out and job_counts(out)["extract_shard"] == 5


def test_bad_config_is_rejected_with_the_key(demo_run):
    wd, _ = demo_run
    ov = overlay(wd, "bad.yaml", {"experiments": {"vs_tiny": {"text": {"backbone": "bert-xxl"}}}})
    out = snakemake(wd, "-n", "--cores", "1", overlays=[ov], check=False)
    assert "experiments.vs_tiny.text.backbone='bert-xxl' is not a key of `backbones`" in out
    ov = overlay(wd, "bad2.yaml", {"backbones": {"tiny-bert": {"model": "x", "modality": "audio"}}})
    out = snakemake(wd, "-n", "--cores", "1", overlays=[ov], check=False)
    assert "config.backbones.tiny-bert: `modality`='audio'" in out and "is not one of ['text', 'image']" in out


def test_a_generated_dataset_may_have_any_name(demo_run):
    wd, _ = demo_run
    ov = overlay(wd, "toy.yaml", {"datasets": {"toy": {"synth": {"items": 40, "users": 50, "seed": 4}}}})
    snakemake(wd, "--cores", "1", "results/toy/data", overlays=[ov])
    meta = json.loads((wd / "results/toy/data/meta.json").read_text())
    assert meta["sources"]["items"] == str(wd / "results/toy/raw/toy_items.tsv") and meta["n_items"] > 0


def test_changing_a_users_image_folder_reruns_preparation_and_image_extraction(demo_run):
    wd, _ = demo_run
    shutil.copytree(wd / "results/demo/raw", wd / "mydata")
    mine = {"items": "mydata/demo_items.tsv", "users": "mydata/am_demo_users.tsv", "images": "mydata/images"}
    ov = overlay(wd, "mine.yaml", {"datasets": {"mine": mine}})
    target = "results/mine/cache/tiny-vit/evenhalf.done"
    snakemake(wd, "--cores", "2", target, overlays=[ov])
    assert job_counts(snakemake(wd, "-n", "--cores", "1", target, overlays=[ov])) == {}
    images = sorted((wd / "mydata/images").iterdir())
    shutil.copy(images[1], images[0])  # the user replaces one picture
    counts = job_counts(snakemake(wd, "-n", "--cores", "1", target, overlays=[ov]))
    assert counts == {"prepare": 1, "extract_shard": 1, "cache_verify": 1}


def test_time_and_memory_by_batch_size_target(demo_run):
    wd, _ = demo_run
    study = {"datasets": ["demo"], "experiments": ["vs_tiny", "lora_tiny"], "batch_sizes": [2, 8], "steps": 3}
    ov = overlay(wd, "bs.yaml", {"targets": {"bs_small": study}})
    snakemake(wd, "--cores", "2", "results/report/bs_small/summary.json", overlays=[ov])
    rows = (wd / "results/report/bs_small/time_memory_by_batch_size.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(float(r.split(",")[6]) > 0 for r in rows[1:])  # s/epoch
    assert (wd / "results/report/bs_small/time_memory_by_batch_size.png").stat().st_size > 1000
    p = json.loads((wd / "results/demo/vs_tiny/profile/bs-8.steps-3.json").read_text())
    cuda = resolve_device("auto").type == "cuda"
    assert p["peak_memory_kind"] == ("cuda_max_allocated" if cuda else "cpu_peak_rss_above_baseline")
    assert p["batch_size"] == 8 and p["steps"] == 3


def test_snakemake_report_makes_one_html_page(demo_run):
    wd, _ = demo_run
    snakemake(wd, "--report", "report.html")
    html = (wd / "report.html").read_text()  # captions are HTML-escaped: @ -> &#64;
    assert "Training curves: validation HR&#64;k" in html and "training_curves.png" in html and "main.csv" in html


def test_recommendations_are_a_target_built_without_retraining(demo_run):
    wd, _ = demo_run
    target = "results/demo/vs_tiny/recommendations.tsv"
    assert job_counts(snakemake(wd, "-n", "--cores", "1", target)) == {"recommend": 1}
    snakemake(wd, "--cores", "1", target)
    lines = (wd / target).read_text().splitlines()
    n_users = json.loads((wd / "results/demo/data/meta.json").read_text())["n_users"]
    assert (
        lines[0].split("\t") == ["user", "rank", "item_id", "asin", "score", "title"] and len(lines) == 1 + 10 * n_users
    )


def test_a_new_metric_reruns_only_the_report(demo_run):
    wd, _ = demo_run
    ov = overlay(wd, "metrics.yaml", {"metrics": {"names": ["HR", "NDCG", "MRR"], "at": [10, 20]}})
    assert job_counts(snakemake(wd, "-n", "--cores", "1", overlays=[ov])) == {"report": 1, "all": 1}
    snakemake(wd, "--cores", "1", overlays=[ov])
    main = (wd / "results/report/demo/main.md").read_text()
    assert "| test NDCG@20 (%) |" in main and "| test MRR@10 (%) |" in main and "n/a" not in main
    snakemake(wd, "--cores", "1")  # the default report back, for whatever reads it later


def test_iisan_runs_as_a_module_of_another_project_with_its_own_config(tmp_path):
    # the README's "Use as a Snakemake module": another project's Snakefile, its own config
    (tmp_path / "mine.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "Snakefile").write_text(f'''configfile: "mine.yaml"


module iisan:
    snakefile:
        "{REPO / "workflow/Snakefile"}"
    config:
        config


use rule * from iisan
''')
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "results/report/demo/summary.json"],
                       cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    assert counts["report"] == 1 and counts["synth"] == 1 and counts["train_run"] > 10


ML_SCENARIO = ".test/microlens-small/config.yaml"


@pytest.fixture(scope="module")
def microlens_run(tmp_path_factory):
    """The multimodal-text scenario run through the DAG: synth (MicroLens layout) ->
    prepare -> caption (tiny LLaVA) -> extract -> train -> report."""
    wd = tmp_path_factory.mktemp("wf-microlens")
    for item in ("config.yaml", "workflow", "iisan", "envs", ".test"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / item)
    snakemake(wd, "--cores", "2", scenario=ML_SCENARIO)
    return wd


def test_multimodal_text_runs_caption_to_report(microlens_run):
    from iisan.extract import cache

    wd = microlens_run
    experiments = yaml.safe_load((REPO / ML_SCENARIO).read_text())["targets"]["multimodal_text_demo"]["experiments"]
    for source in ("cover", "video"):
        meta = json.loads((wd / f"results/microlens_demo/captions/{source}/captions.json").read_text())
        assert meta["n_items"] == 150 and meta["decoding"] == "greedy" and meta["model"].endswith("tiny-llava")
    attrs = cache.verify(wd / "results/microlens_demo/cache/tiny-bert/video_caption-evenhalf.zarr")
    assert attrs["field"] == "video_caption"
    table = (wd / "results/report/multimodal_text_demo/multimodal_text.md").read_text()
    for label in ("FFT title", "FFT cover caption", "Title-Video caption", "Video-Cover caption", "Title x2"):
        assert f"| {label} |" in table, table
    assert len([e for e in experiments if e != "popularity"]) == len(table.split("| microlens_demo |")) - 1


def test_changed_caption_prompt_reruns_captioning_and_its_dependants_only(microlens_run):
    wd = microlens_run
    assert job_counts(snakemake(wd, "-n", "--cores", "1", scenario=ML_SCENARIO)) == {}
    prompt = {"datasets": {"microlens_demo": {"captions": {"cover": {"prompt": "Name the main colour."}}}}}
    out = snakemake(wd, "-n", "--cores", "1", scenario=ML_SCENARIO, overlays=[overlay(wd, "prompt.yaml", prompt)])
    # the cover captions, the one cache of them, the two experiments reading it, the report
    assert job_counts(out) == {"caption": 1, "extract_shard": 1, "cache_verify": 1, "train": 2, "report": 1, "all": 1}
    assert "results/microlens_demo/captions/cover" in out and "mt_cover_tiny" in out and "mt_video_cover_tiny" in out
