"""The paper, table by table: the machine-readable tables (iisan/results/paper.yaml)
against the paper's text, every target against its table, the layer selections of
Tables VII and VIII against the published lists, and the report's paper columns."""

import csv
import json
import re

import pytest

from iisan.extract.backbones import shipped_config
from iisan.extract.layerdrop import select_layers
from iisan.pipeline.config import validate
from iisan.pipeline.workflow import Workflow
from iisan.results import paper
from iisan.results.report import build_report

from conftest import REPO, merged_config

SEEDS = REPO.parent / "shared/seeds/iisan-versa-paper.txt"
ROMAN = {"table3": "III", "table4": "IV", "table5": "V", "table6": "VI", "table7": "VII", "table8": "VIII",
         "table9": "IX"}  # fmt: skip
FRACTIONS = {"table4", "table5", "table9"}  # tables the paper prints as fractions, not percent


@pytest.fixture(scope="module")
def workflow():
    return Workflow(validate(merged_config()))


def _section(tid: str) -> str:
    text = SEEDS.read_text()
    start = text.index(f"TABLE {ROMAN[tid]}:")
    return text[start : text.index("\n\n", start)]


def _printed(tid: str, value: float) -> str:
    return f"{value / 100:.4f}" if tid in FRACTIONS else f"{value:.2f}"


def test_every_published_number_is_the_papers():
    tables = paper.tables()
    assert sorted(tables) == sorted(ROMAN)
    for tid, t in tables.items():
        section = _section(tid)
        flat = re.sub(r"\s+", "", section)
        for r in t["rows"]:
            hr, ndcg = (_printed(tid, r.published[m]) for m in paper.METRICS)
            if tid == "table3":  # one line per dataset and metric, the methods in columns
                continue
            assert f"{hr} {ndcg}" in section, (tid, r.label)  # the row's pair, side by side as printed
            if tid in ("table7", "table8", "table9", "table4", "table5") and r.mean_of is None:
                label = re.sub(r"\s+", "", r.label.split(" (")[0].removeprefix("FFT "))
                assert label.lower() in flat.lower(), (tid, r.label)
    # Table III: per dataset, the HR@10 and NDCG@10 lines list the six methods in the rows' order
    lines = _section("table3").splitlines()
    for ds, name in (("scientific", "Scientific"), ("instrument", "Instrument"), ("office", "Office")):
        rows = [r for r in tables["table3"]["rows"] if r.dataset == ds]
        i = next(i for i, ln in enumerate(lines) if f"{name} HR@10" in ln)
        for metric, line in zip(paper.METRICS, (lines[i], lines[i + 1]), strict=True):
            assert " ".join(f"{r.published[metric]:.2f}" for r in rows) in line, (ds, metric)
    # the "Mean" rows are the means of their groups, as printed
    for r in tables["table8"]["rows"]:
        if r.mean_of:
            members = [x for x in tables["table8"]["rows"] if x.group == r.mean_of]
            for m in paper.METRICS:
                assert sum(x.published[m] for x in members) / len(members) == pytest.approx(r.published[m], abs=0.01)


def test_one_experiment_carries_one_published_number_everywhere():
    # va_bert_large is Table III's IISAN-VA, Table IV's BERT-large, Table VI's and Table VIII's 6+6 default
    rows = [r for r in paper.rows() if r.experiment == "va_bert_large" and r.dataset == "scientific"]
    assert {r.table for r in rows} == {"table3", "table4", "table6", "table8"}
    assert paper.published("scientific", "va_bert_large") == {"HR@10": 7.29, "NDCG@10": 4.41}
    assert paper.published("microlens", "vs_bert_vit") == {"HR@10": 9.60, "NDCG@10": 5.30}  # Tables V and IX
    assert paper.published("demo", "vs_tiny") is None


def test_every_table_target_runs_exactly_its_published_rows(workflow):
    config = workflow.config
    for t in paper.tables().values():
        published = {(r.dataset, r.experiment) for r in t["rows"] if r.experiment}
        for target in t["targets"]:
            runs = set(workflow.target_runs(target))
            if target == "figure4":  # Figure 4 plots Table IV's ViT-base rows
                assert runs == {(r.dataset, r.experiment) for r in t["rows"] if r.label.endswith("+ViT-base")}
                continue
            datasets = set(config["targets"][target]["datasets"])
            assert runs == {key for key in published if key[0] in datasets}, target
    for tid, t in paper.tables().items():  # the labels name what runs: a row's towers are the label's encoders
        for r in t["rows"]:
            if r.experiment:
                assert r.experiment in config["experiments"], (tid, r.label)
    figures = paper.figures()
    assert set(figures) == {"figure4", "figure5", "figure7"} <= set(config["targets"])
    assert config["targets"]["figure5"]["batch_sizes"] == [1, 2, 4, 8, 16, 32]  # the paper's {1, ..., 32}
    # paper_all is the union of every table's and figure's runs, and builds each of their reports
    everything = set()
    for t in paper.tables().values():
        for target in t["targets"]:
            everything |= set(workflow.target_runs(target))
    everything |= set(workflow.target_runs("figure7"))
    assert set(workflow.target_runs("paper_all")) == everything
    inputs = workflow.report_inputs("paper_all")
    for target in ("table3_office", "table8", "figure5", "figure7"):
        assert f"results/report/{target}/summary.json" in inputs


def test_figure7_pairs_every_text_encoder_full_against_dropped(workflow):
    config = workflow.config
    by_backbone: dict = {}
    for _, e in workflow.target_runs("figure7"):
        text = config["experiments"][e]["text"]
        kind = "full" if text["layers"].get("scheme") == "all" else "dropped"
        by_backbone.setdefault(text["backbone"], set()).add(kind)
    assert len(by_backbone) == 8 and all(kinds == {"full", "dropped"} for kinds in by_backbone.values())


# The authors' block lists (0-based; their code's side_adapter lists and method.md section 3), and
# those the paper's Table VIII caption defines: top / down = the upper / lower half of the blocks.
BERT_LARGE = {
    "24": list(range(24)),
    "12(even_all)": list(range(1, 24, 2)),  # the authors' "1,3,5,...,23"
    "12(top)": list(range(12, 24)),
    "12(down)": list(range(12)),
    "6(even_all)": [3, 7, 11, 15, 19, 23],  # the authors' "3,7,11,15,19,23"
    "6(even_top12)": [13, 15, 17, 19, 21, 23],  # the authors' "13,15,17,19,21,23"
    "6(even_down12)": [1, 3, 5, 7, 9, 11],
}
VIT_BASE = {"12": list(range(12)), "12(all)": list(range(12)), "6(even_all)": [1, 3, 5, 7, 9, 11],
            "6(top)": list(range(6, 12)), "6(down)": list(range(6))}  # fmt: skip


def _blocks(n_layers, spec):
    return [i - 1 for i in select_layers(n_layers, {**spec, "embedding": False})]


def test_table8_rows_tap_the_published_blocks(workflow):
    config = workflow.config
    for r in paper.tables()["table8"]["rows"]:
        if not r.experiment:
            continue
        exp = config["experiments"][r.experiment]
        text, image = ("24", "12") if r.label == "24+12 Full" else r.label.split("+")
        assert _blocks(24, exp["text"]["layers"]) == BERT_LARGE[text], r.label
        assert _blocks(12, exp["image"]["layers"]) == VIT_BASE[image], r.label
        assert exp["text"]["layers"].get("embedding", True) == exp["image"]["layers"].get("embedding", True)


def test_table7_block_counts_and_the_asymmetric_defaults(workflow):
    config = workflow.config
    for r in paper.tables()["table7"]["rows"]:
        n = int(r.label.split()[0])
        exp = config["experiments"][r.experiment]
        for tower in ("text", "image"):
            blocks = _blocks(12, exp[tower]["layers"])
            assert len(blocks) == n and blocks[-1] == 11, r.label  # n blocks kept, ending at the last
    assert _blocks(12, config["experiments"]["vs_bert_vit"]["text"]["layers"]) == [1, 3, 5, 7, 9, 11]
    # every VA row of Tables III-VI pairs as many text taps as image taps (Table VIII's 6+6 default)
    for e, (nt, ni) in {"va_bert_large": (24, 12), "va_llama3_70b": (80, 12), "va_gemma_7b": (28, 12),
                        "va_llama3_70b_vit_large": (80, 24), "va_llama3_70b_vit_huge": (80, 32),
                        "vs_bert_vit_large": (12, 24), "vs_bert_vit_huge": (12, 32)}.items():  # fmt: skip
        exp = config["experiments"][e]
        assert len(select_layers(nt, exp["text"]["layers"])) == len(select_layers(ni, exp["image"]["layers"])), e
    assert _blocks(80, config["experiments"]["va_llama3_70b"]["text"]["layers"]) == [4, 19, 34, 49, 64, 79]


def _fake_run(results, ds, exp, hr, ndcg, seeds=(1, 2), sd=0.1):
    d = results / ds / exp
    d.mkdir(parents=True)
    m = {"test": {"HR@10": hr / 100, "NDCG@10": ndcg / 100}, "valid": {"HR@10": hr / 100, "NDCG@10": ndcg / 100},
         "sd": {"test": {"HR@10": sd / 100, "NDCG@10": sd / 100}}, "seeds": list(seeds), "best_epoch": 3,
         "metric_k": 10}  # fmt: skip
    (d / "metrics.json").write_text(json.dumps(m))


def test_report_sets_the_paper_beside_every_row(tmp_path):
    results = tmp_path / "results"
    _fake_run(results, "scientific", "vs_bert_vit", 6.50, 4.00)  # published 6.83 / 4.14
    _fake_run(results, "scientific", "va_bert_large", 7.30, 4.50)  # published 7.29 / 4.41
    for e, hr in (("v8_12e_12a", 6.0), ("v8_12t_12a", 7.0), ("v8_12d_12a", 8.0)):
        _fake_run(results, "scientific", e, hr, 4.0)
    _fake_run(results, "demo", "vs_tiny", 50.0, 30.0)
    groups = {"vs_bert_vit": "main", "va_bert_large": "main", "v8_12e_12a": "layers", "v8_12t_12a": "layers",
              "v8_12d_12a": "layers"}  # fmt: skip
    exps = {"scientific": {e: {"group": g, "label": e} for e, g in groups.items()},
            "demo": {"vs_tiny": {"group": "main", "label": "IISAN-VS"}}}  # fmt: skip
    build_report(results, tmp_path / "rep", experiments=exps)
    main = {r["experiment"]: r for r in csv.DictReader((tmp_path / "rep/main.csv").read_text().splitlines())}
    assert float(main["vs_bert_vit"]["paper test HR@10 (%)"]) == 6.83
    assert float(main["vs_bert_vit"]["difference HR@10"]) == pytest.approx(6.50 - 6.83)
    assert float(main["va_bert_large"]["difference NDCG@10"]) == pytest.approx(4.50 - 4.41)
    assert main["vs_tiny"]["paper test HR@10 (%)"] == "" and main["vs_tiny"]["difference HR@10"] == ""
    md = (tmp_path / "rep/main.md").read_text()
    assert "| paper HR@10 / NDCG@10 (%) | difference |" in md and "| 6.83 / 4.14 | -0.33 / -0.14 |" in md
    rows = list(csv.DictReader((tmp_path / "rep/reproduction.csv").read_text().splitlines()))
    assert len(rows) == 2 * len(paper.rows())  # every published row, both metrics: none vanishes
    get = {(r["table"], r["row"], r["dataset"], r["metric"]): r for r in rows}
    vs = get[("table3", "IISAN-VS", "scientific", "HR@10")]
    assert float(vs["measured"]) == 6.50 and float(vs["difference"]) == pytest.approx(-0.33)
    assert vs["within spread"] == "no"  # 0.33 off, sd 0.1
    va = get[("table3", "IISAN-VA", "scientific", "HR@10")]
    assert va["within spread"] == "yes"  # 0.01 off, sd 0.1
    assert get[("table3", "IISAN-VA", "office", "HR@10")]["status"].startswith("not run in this target")
    assert get[("table5", "DSSM", "microlens", "HR@10")]["status"].startswith("not an iisan method")
    mean = get[("table8", "Mean (12+12)", "scientific", "HR@10")]
    assert float(mean["measured"]) == pytest.approx(7.0) and float(mean["difference"]) == pytest.approx(7.0 - 6.91)
    assert get[("table8", "Mean (6+6)", "scientific", "HR@10")]["status"] == "mean of 9 rows; 1 measured in this target"
    text = (tmp_path / "rep/reproduction.md").read_text()
    assert text.count("## Table") == len(paper.tables())
    assert "| IISAN-VS | scientific | vs_bert_vit | 6.83 | 6.50 ± 0.10 | -0.33 | no |" in text
    assert (tmp_path / "rep/layers.md").is_file() and "v8_12t_12a" in (tmp_path / "rep/layers.md").read_text()


def test_figure7_plot_pairs_full_and_dropped_caches_by_text_encoder(tmp_path):
    from iisan.results import plots

    results = tmp_path / "results"
    for e, secs in (("va_gemma_7b", 2.0), ("f7_gemma_7b_full", 9.0), ("vs_only", 1.0)):
        _fake_run(results, "scientific", e, 7.0, 4.0)
        eff = {"method": "iisan", "seconds_per_epoch": secs, "peak_memory_bytes": 2**30, "trainable_parameters": 1,
               "peak_memory_kind": "cuda_max_allocated"}  # fmt: skip
        (results / "scientific" / e / "efficiency.json").write_text(json.dumps(eff))
    backbone = {"va_gemma_7b": "gemma-7b", "f7_gemma_7b_full": "gemma-7b", "vs_only": "bert-base"}
    exps = {"scientific": {e: {"group": "scaling", "label": e, "text_backbone": backbone[e], "text_params_b": 7,
                               "text_layers": "all" if "full" in e else "even6"} for e in backbone}}  # fmt: skip
    build_report(results, tmp_path / "rep", experiments=exps)
    assert (tmp_path / "rep/layerdrop_cost.png").stat().st_size > 10_000  # a figure, not the "nothing" note
    from iisan.results.report import _load

    runs, _ = _load(results, exps)
    pairs = plots.layerdrop_pairs(runs)
    # one encoder run both ways; bert-base has no full run, so it is left out
    assert {k: {kind: e["seconds_per_epoch"] for kind, e in v.items()} for k, v in pairs.items()} == {
        ("scientific", "gemma-7b", 7): {"full": 9.0, "dropped": 2.0}
    }


def test_backbone_layer_counts_are_the_shipped_model_configs(workflow):
    # n_layers drives the config-time tap check: it must be what the model itself has
    checked = 0
    for name, b in workflow.config["backbones"].items():
        folder = shipped_config(name)
        if b["n_layers"] is None or folder is None:
            continue
        cfg = json.loads((folder / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        assert b["n_layers"] == cfg["num_hidden_layers"], name
        checked += 1
    assert checked == 16  # every real backbone but none of the tiny ones (their n_layers is not set)
