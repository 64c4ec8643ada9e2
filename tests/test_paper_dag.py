"""Every table and figure of the paper as a target: a dry run of each (no model is loaded)
must plan exactly the jobs its rows need, counted here by hand from the rows."""

import shutil

import pytest
from test_workflow import job_counts, snakemake

from conftest import REPO

pytestmark = pytest.mark.slow

PAPER = ".test/paper-dryrun/config.yaml"  # the paper's datasets as placeholder files

# caches = distinct (backbone, layer selection, field) among the rows that read caches; a
# 4-shard GPTQ store adds 3 extraction jobs and one cache_init; embedded baselines read none
TABLE3 = {"prepare": 1, "extract_shard": 3, "cache_verify": 3, "train": 6, "report": 1}
EXPECTED = {
    # BERT-base, ViT-base, BERT-large {n: 6}; 4 embedded baselines + VS + VA
    "table3_scientific": TABLE3,
    "table3_instrument": TABLE3,
    "table3_office": TABLE3,
    # 15 text caches (four Llama-3-70B ones, 4 shards each: it/even6, even6, even12, even16) + ViT-base,
    # ViT-large {n: 6}, ViT-huge {n: 6}, ViT-large half, ViT-huge half
    "table4": {
        "prepare": 1,
        "cache_init": 4,
        "extract_shard": 16 + 4 * 4,
        "cache_verify": 20,
        "train": 17,
        "report": 1,
    },
    # Table IV's 13 ViT-base rows: 13 text caches (two 70B) + ViT-base
    "figure4": {
        "prepare": 1,
        "cache_init": 2,
        "extract_shard": 12 + 2 * 4,
        "cache_verify": 14,
        "train": 13,
        "report": 1,
    },
    # SASRec (3 seeds, aggregated), FFT, VS, VA on MicroLens
    "table5": {
        "prepare": 1,
        "extract_shard": 3,
        "cache_verify": 3,
        "train": 3,
        "train_run": 3,
        "aggregate": 1,
        "report": 1,
    },
    # VS and VA: half and all layers of BERT-base and ViT-base, {n: 6} and all of BERT-large
    "table6": {"prepare": 1, "extract_shard": 6, "cache_verify": 6, "train": 12, "report": 1},
    # 2, 3, 4, 6 and 12 blocks of both towers
    "table7": {"prepare": 1, "extract_shard": 10, "cache_verify": 10, "train": 5, "report": 1},
    # BERT-large: all, {n: 12}, top, bottom, {n: 6}, {n: 6} of top, of bottom; ViT-base: all, half, top, bottom
    "table8": {"prepare": 1, "extract_shard": 11, "cache_verify": 11, "train": 22, "report": 1},
    # two captioners; BERT-base on titles, cover and video captions, ViT-base; three FFT rows read captions
    "table9": {"prepare": 1, "caption": 2, "extract_shard": 4, "cache_verify": 4, "train": 10, "report": 1},
    # 6 methods x 6 batch sizes; VS's two caches (uncached and the embedded ones read the backbones)
    "figure5": {"prepare": 1, "extract_shard": 2, "cache_verify": 2, "profile": 36, "report_batch_size": 1},
    # 8 text encoders x {LayerDrop, all layers} (Llama-3-70B's two with 4 shards) + ViT-base half and all
    "figure7": {
        "prepare": 1,
        "cache_init": 2,
        "extract_shard": 16 + 2 * 4,
        "cache_verify": 18,
        "train": 16,
        "report": 1,
    },
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("paper-dag")
    for item in ("config.yaml", "workflow", "iisan", "envs", ".test"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / item)
    return wd


def _plan(wd, target):
    return job_counts(snakemake(wd, "-n", "--cores", "1", f"results/report/{target}/summary.json", scenario=PAPER))


@pytest.mark.parametrize("target", list(EXPECTED))
def test_each_paper_target_plans_exactly_its_rows(workdir, target):
    assert _plan(workdir, target) == EXPECTED[target]


def test_paper_all_builds_every_table_and_figure_once(workdir):
    plan = _plan(workdir, "paper_all")
    # shared runs and caches are planned once: 4 datasets, 84 + 3 distinct runs, 53 distinct caches
    assert plan == {"prepare": 4, "cache_init": 5, "caption": 2, "extract_shard": 68, "cache_verify": 53,
                    "train": 84, "train_run": 3, "aggregate": 1, "profile": 36, "report": 12,
                    "report_batch_size": 1}  # fmt: skip
