# Input functions and config lookups. Anything bigger belongs in the iisan package.
import json
import os
import re
import shlex
import sys
from pathlib import Path

from iisan import methods
from iisan.config import PIPELINE_ONLY
from iisan.images import listing_fingerprint
from iisan.layerdrop import spec_tag
from iisan.provenance import code_hash
from iisan.runs import experiment_runs, is_multi, run_named

# Jobs call `iisan` from the environment Snakemake runs in, activated or not
# (`.venv/bin/snakemake ...`); a rule's conda env, when used, comes first on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def get_final_output():
    return [f"results/report/{config['default_target']}/summary.json"]


def raw_format(ds):
    d = config["datasets"][ds]
    return d["synth"]["format"] if "synth" in d else d["format"]


def raw_files(ds):
    d = config["datasets"][ds]
    if "synth" not in d:
        return {"items": d["items"], "users": d["users"], "images": d["images"], "frames": d["frames"]}
    root = f"results/{ds}/raw"
    if raw_format(ds) == "microlens":  # the layout iisan.microlens.synthesize_microlens writes
        return {"items": f"{root}/MicroLens-100k_title_en.csv", "users": f"{root}/MicroLens-100k_pairs.tsv",
                "images": f"{root}/MicroLens-100k_covers.zip", "frames": f"{root}/MicroLens-100k_frames.zip"}
    return {"items": f"{root}/{ds}_items.tsv", "users": f"{root}/am_{ds}_users.tsv", "images": f"{root}/images",
            "frames": None}


def synth_names(fmt):
    return names_regex([ds for ds, d in config["datasets"].items() if "synth" in d and raw_format(ds) == fmt])


def get_raw_inputs(wildcards):
    f = raw_files(wildcards.ds)
    return {"items_tsv": f["items"], "users_tsv": f["users"]}


def get_prepare_settings(wildcards):
    """Only what preparation reads: a dataset's `train` settings must not rerun it."""
    d = config["datasets"][wildcards.ds]
    return {**{k: d[k] for k in ("missing_images", "encoding", "min_seq_len", "max_seq_len")}, "format": raw_format(wildcards.ds)}


def images_flag(wildcards):
    images = raw_files(wildcards.ds)["images"]
    return f"--images {shlex.quote(images)}" if images else ""


def user_listing(ds, key):
    """A user's images or frames are not a job output, so Snakemake sees changes to them through this param."""
    d = config["datasets"][ds]
    return listing_fingerprint(d[key]) if "synth" not in d and d[key] else None


def get_images_listing(wildcards):
    return user_listing(wildcards.ds, "images")


def backbone_json(name):
    """The backbone spec `iisan extract` and `iisan train` receive (pipeline-only keys removed)."""
    b = {k: v for k, v in config["backbones"][name].items() if k not in PIPELINE_ONLY}
    if b.get("max_memory"):  # YAML gives GPU ids as ints; JSON keys are strings (iisan turns them back)
        b["max_memory"] = {str(k): v for k, v in b["max_memory"].items()}
    return json.dumps(b, sort_keys=True)


def tower_tag(tower):
    """A cache's name: the layer spec's tag, after the caption field it reads if any."""
    field = tower["field"]
    return spec_tag(tower["layers"]) if field in ("title", "image") else f"{field}-{spec_tag(tower['layers'])}"


def cache_path(ds, tower, suffix):
    return f"results/{ds}/cache/{tower['backbone']}/{tower_tag(tower)}{suffix}"


def tower_for(wildcards):
    """A tower whose cache this is (any experiment using it gives the same spec and field)."""
    for exp in config["experiments"].values():
        for tower in ("text", "image"):
            t = exp.get(tower)
            if t and t["backbone"] == wildcards.backbone and tower_tag(t) == wildcards.tag:
                return t
    raise ValueError(f"no experiment reads cache {wildcards.tag!r} of backbone {wildcards.backbone!r}")


def layers_for(wildcards):
    return json.dumps(tower_for(wildcards)["layers"], sort_keys=True)


def caption_source(wildcards):
    field = tower_for(wildcards)["field"]
    return field.removesuffix("_caption") if field.endswith("_caption") else None


def get_caption_inputs(wildcards):
    source = caption_source(wildcards)
    return {"captions": f"results/{wildcards.ds}/captions/{source}"} if source else {}


def captions_flag(wildcards):
    source = caption_source(wildcards)
    return f"--captions results/{wildcards.ds}/captions/{source}" if source else ""


def captioner_json(ds, source):
    c = {k: v for k, v in config["datasets"][ds]["captions"][source].items() if k != "tiny"}
    if c.get("max_memory"):
        c["max_memory"] = {str(k): v for k, v in c["max_memory"].items()}
    return json.dumps(c, sort_keys=True)


def get_captioner_inputs(wildcards):
    c = config["datasets"][wildcards.ds]["captions"][wildcards.source]
    return [f"results/backbones/{Path(c['model']).name}/iisan-tiny.json"] if c.get("tiny") else []


def frames_flag(wildcards):
    frames = raw_files(wildcards.ds)["frames"]
    return f"--frames {shlex.quote(frames)}" if wildcards.source == "video" and frames else ""


def get_frames_listing(wildcards):
    return user_listing(wildcards.ds, "frames") if wildcards.source == "video" else None


def tiny_stamp(backbone):
    """A tiny backbone is built by the pipeline; real ones come from the hub cache."""
    return [f"results/backbones/{backbone}/iisan-tiny.json"] if config["backbones"][backbone]["tiny"] else []


def get_backbone_inputs(wildcards):
    return tiny_stamp(wildcards.backbone)


def get_shard_outputs(wildcards):
    n = config["backbones"][wildcards.backbone]["shards"]
    return [f"results/{wildcards.ds}/cache/{wildcards.backbone}/{wildcards.tag}.shards/{i}-of-{n}.done" for i in range(n)]


def get_store_init(wildcards):
    # several shards write one store: create it first, once, so they never race to
    if int(wildcards.n) > 1:
        return [f"results/{wildcards.ds}/cache/{wildcards.backbone}/{wildcards.tag}.init"]
    return []


def method_of(exp_name):
    return methods.get(config["experiments"][exp_name]["method"])


def towers(exp_name):
    exp = config["experiments"][exp_name]
    return {t: exp[t] for t in ("text", "image") if t in exp}


def get_train_inputs(wildcards):
    """Caches for cached methods; the backbones themselves for methods that run them in the loop."""
    method = method_of(wildcards.exp)
    if method.needs_cache:
        return {t: cache_path(wildcards.ds, tower, ".done") for t, tower in towers(wildcards.exp).items()}
    return {f"{t}_backbone": tiny_stamp(tower["backbone"]) for t, tower in towers(wildcards.exp).items()}


def train_code(wildcards):
    return code_hash("train", method_of(wildcards.exp).name)


def profile_code(wildcards):
    return code_hash("profile", method_of(wildcards.exp).name)


def names_regex(names):
    return "|".join(re.escape(n) for n in names) or "(?!)"


# an experiment's metrics.json is a run's (train) or the aggregate of its runs (aggregate)
MULTI_RUN = names_regex([e for e in config["experiments"] if is_multi(config, e)])
SINGLE_RUN = names_regex([e for e in config["experiments"] if not is_multi(config, e)])


def train_settings(wildcards):
    """A run's settings; a rule with no {run} (profile) takes the experiment's first run."""
    if "run" in wildcards.keys():
        run = run_named(config, wildcards.ds, wildcards.exp, wildcards.run)
    else:
        run = experiment_runs(config, wildcards.ds, wildcards.exp)[0]
    return json.dumps(run.settings, sort_keys=True)


def run_folders(wildcards):
    """(folder, run) of each run of a multi-run experiment."""
    return [(f"results/{wildcards.ds}/{wildcards.exp}/{r.name}", r)
            for r in experiment_runs(config, wildcards.ds, wildcards.exp)]


def get_run_outputs(wildcards):
    return [f"{d}/metrics.json" for d, _ in run_folders(wildcards)]


def aggregate_runs(wildcards):
    return json.dumps([{"dir": d, "point": r.point, "seed": r.seed} for d, r in run_folders(wildcards)], sort_keys=True)


def item_flags(wildcards):
    """How `iisan train` reads items: --{t}-cache stores, or --{t}-backbone/--{t}-layers specs."""
    method = method_of(wildcards.exp)
    flags = []
    for t, tower in towers(wildcards.exp).items():
        if method.needs_cache:
            flags += [f"--{t}-cache", cache_path(wildcards.ds, tower, ".zarr")]
        else:
            flags += [f"--{t}-backbone", shlex.quote(backbone_json(tower["backbone"])),
                      f"--{t}-layers", shlex.quote(json.dumps(tower["layers"], sort_keys=True))]
    return " ".join(flags)


QUALITY_TARGETS = names_regex([t for t, v in config["targets"].items() if not v.get("batch_sizes")])
BATCH_SIZE_TARGETS = names_regex([t for t, v in config["targets"].items() if v.get("batch_sizes")])


def target_runs(target):
    t = config["targets"][target]
    return [(ds, e) for ds in t["datasets"] for e in t["experiments"]]


def get_report_inputs(wildcards):
    t = config["targets"][wildcards.target]
    if t.get("batch_sizes"):  # a time-and-memory study
        return [f"results/{ds}/{e}/profile/bs-{b}.steps-{t['steps']}.json" for ds, e in target_runs(wildcards.target)
                for b in t["batch_sizes"]]
    return [f"results/{ds}/{e}/metrics.json" for ds, e in target_runs(wildcards.target)]


def report_experiments(wildcards):
    out = {}
    for ds, e in target_runs(wildcards.target):
        exp = config["experiments"][e]
        text = exp.get("text", {}).get("backbone")
        out.setdefault(ds, {})[e] = {"group": exp["group"], "label": exp.get("label", e), "text_backbone": text,
                                     "text_params_b": config["backbones"][text]["params_b"] if text else None}
    return json.dumps(out, sort_keys=True)


def report_output(name, caption, subcategory):
    """A report output flagged for `snakemake --report`, captioned by workflow/report/<caption>."""
    return report(f"results/report/{{target}}/{name}", caption=f"../report/{caption}", category="{target}",
                  subcategory=subcategory)
