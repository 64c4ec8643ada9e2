# Input functions: each calls iisan.pipeline.workflow, where the logic lives (and is unit-tested).
import json
import os
import sys
from pathlib import Path

from iisan.core.provenance import code_hash
from iisan.pipeline.workflow import Workflow
from iisan.results.paper import PAPER as PAPER_TABLES

# Jobs call `iisan` from the environment Snakemake runs in, activated or not
# (`.venv/bin/snakemake ...`); a rule's conda env, when used, comes first on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

W = Workflow(config)


def get_final_output():
    return W.final_output()


def get_raw_inputs(wildcards):
    return W.raw_inputs(wildcards.ds)


def get_prepare_settings(wildcards):
    return W.prepare_settings(wildcards.ds)


def get_images_flag(wildcards):
    return W.images_flag(wildcards.ds)


def get_images_listing(wildcards):
    return W.user_listing(wildcards.ds, "images")


def get_synth_settings(wildcards):
    return config["datasets"][wildcards.ds]["synth"]


def get_tiny_inputs(wildcards):
    # the GPTQ model is quantised from the tiny Llama built by its own job
    return W.tiny_stamp("tiny-llama") if wildcards.backbone == "tiny-llama-gptq" else []


def get_captioner_inputs(wildcards):
    return W.captioner_inputs(wildcards.ds, wildcards.source)


def get_caption_frames(wildcards):
    return W.caption_frames_inputs(wildcards.ds, wildcards.source)


def get_captioner(wildcards):
    return W.captioner_json(wildcards.ds, wildcards.source)


def get_frames_flag(wildcards):
    return W.frames_flag(wildcards.ds, wildcards.source)


def get_frames_listing(wildcards):
    return W.frames_listing(wildcards.ds, wildcards.source)


def get_caption_inputs(wildcards):
    return W.caption_inputs(wildcards.ds, wildcards.backbone, wildcards.tag)


def get_captions_flag(wildcards):
    return W.captions_flag(wildcards.ds, wildcards.backbone, wildcards.tag)


def get_backbone_inputs(wildcards):
    return W.tiny_stamp(wildcards.backbone)


def get_backbone(wildcards):
    return W.backbone_json(wildcards.backbone)


def get_layers(wildcards):
    return W.layers_json(wildcards.backbone, wildcards.tag)


def get_store(wildcards):
    return W.store(wildcards.ds, wildcards.backbone, wildcards.tag)


def get_store_init(wildcards):
    return W.store_init(wildcards.ds, wildcards.backbone, wildcards.tag, wildcards.n)


def get_shard_outputs(wildcards):
    return W.shard_outputs(wildcards.ds, wildcards.backbone, wildcards.tag)


def get_train_inputs(wildcards):
    return W.train_inputs(wildcards.ds, wildcards.exp)


def get_train_settings(wildcards):
    return W.train_settings(wildcards.ds, wildcards.exp, wildcards.get("run"))


def get_run_tags(wildcards):
    return W.run_tags(wildcards.ds, wildcards.exp, wildcards.get("run"))


def get_item_flags(wildcards):
    return W.item_flags(wildcards.ds, wildcards.exp)


def get_train_code(wildcards):
    return W.train_code(wildcards.exp)


def get_profile_code(wildcards):
    return W.train_code(wildcards.exp, stage="profile")


def get_run_outputs(wildcards):
    return W.run_outputs(wildcards.ds, wildcards.exp)


def get_aggregate_runs(wildcards):
    return W.aggregate_runs(wildcards.ds, wildcards.exp)


def get_metric_k(wildcards):
    return W.metric_k(wildcards.ds, wildcards.exp)


def get_report_inputs(wildcards):
    return W.report_inputs(wildcards.target)


def get_report_experiments(wildcards):
    return W.report_experiments(wildcards.target)


def report_output(name, caption, subcategory):
    """A report output flagged for `snakemake --report`, captioned by workflow/report/<caption>."""
    return report(
        f"results/report/{{target}}/{name}",
        caption=f"../report/{caption}",
        category="{target}",
        subcategory=subcategory,
    )
