# Input functions and config lookups. Anything bigger belongs in the iisan package.
import json
import os
import shlex
import sys
from pathlib import Path

from iisan.layers import spec_tag
from iisan.provenance import code_hash

# Jobs call `iisan` from the environment Snakemake runs in, activated or not
# (`.venv/bin/snakemake ...`); a rule's conda env, when used, comes first on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _need(section, key):
    if key not in config[section]:
        raise ValueError(f"config.yaml: `{section}` has no entry {key!r}; known: {sorted(config[section])}")
    return config[section][key]


def check_config():
    """Cross-references the schema cannot express, with the dotted key that is wrong."""
    for name, exp in config["experiments"].items():
        for tower in ("text", "image"):
            if tower in exp and exp[tower]["backbone"] not in config["backbones"]:
                raise ValueError(f"config.yaml: experiments.{name}.{tower}.backbone={exp[tower]['backbone']!r} is not a key of `backbones`")
            if tower in exp and config["backbones"][exp[tower]["backbone"]]["modality"] != tower:
                raise ValueError(f"config.yaml: experiments.{name}.{tower} uses {exp[tower]['backbone']!r}, a {config['backbones'][exp[tower]['backbone']]['modality']} backbone")
        if exp.get("method", "iisan") not in ("id", "pop") and not ("text" in exp or "image" in exp):
            raise ValueError(f"config.yaml: experiments.{name} needs a `text` and/or `image` tower for method {exp.get('method', 'iisan')!r}")
    _need("targets", config["default_target"])
    for t in config["targets"].values():
        for ds in t["datasets"]:
            _need("datasets", ds)
        for e in t["experiments"]:
            _need("experiments", e)


check_config()

LIVE_METHODS = ("uncached", "fft", "lora", "adapter", "bitfit")  # backbones run inside training


def get_final_output():
    return [f"results/report/{config['default_target']}/summary.json"]


def raw_files(ds):
    d = _need("datasets", ds)
    if "synth" in d:
        root = f"results/{ds}/raw"
        return {"items": f"{root}/{ds}_items.tsv", "users": f"{root}/am_{ds}_users.tsv", "images": f"{root}/images"}
    return {"items": d["items"], "users": d["users"], "images": d.get("images")}


def get_raw_inputs(wildcards):
    f = raw_files(wildcards.ds)
    return [f["items"], f["users"]]


def backbone_json(name):
    """The backbone spec `iisan extract` receives (pipeline-only keys removed)."""
    b = {k: v for k, v in _need("backbones", name).items() if k not in ("tiny", "shards", "params_b")}
    if "max_memory" in b:  # YAML gives GPU ids as ints; JSON keys are strings (iisan turns them back)
        b["max_memory"] = {str(k): v for k, v in b["max_memory"].items()}
    return json.dumps(b, sort_keys=True)


def tower_layers(tower):
    return tower.get("layers", {"scheme": "even"})


def cache_path(ds, tower, suffix):
    return f"results/{ds}/cache/{tower['backbone']}/{spec_tag(tower_layers(tower))}{suffix}"


def layers_for(wildcards):
    """The layer spec whose tag is in the path (any experiment using it gives the same spec)."""
    for exp in config["experiments"].values():
        for tower in ("text", "image"):
            t = exp.get(tower)
            if t and t["backbone"] == wildcards.backbone and spec_tag(tower_layers(t)) == wildcards.tag:
                return json.dumps(tower_layers(t), sort_keys=True)
    raise ValueError(f"no experiment selects layers {wildcards.tag!r} of backbone {wildcards.backbone!r}")


def tiny_stamp(backbone):
    """A tiny backbone is built by the pipeline; real ones come from the hub cache."""
    return [f"results/backbones/{backbone}/iisan-tiny.json"] if _need("backbones", backbone).get("tiny") else []


def get_backbone_inputs(wildcards):
    return tiny_stamp(wildcards.backbone)


def nshards(backbone):
    return int(_need("backbones", backbone).get("shards", 1))


def get_shard_outputs(wildcards):
    n = nshards(wildcards.backbone)
    return [f"results/{wildcards.ds}/cache/{wildcards.backbone}/{wildcards.tag}.shards/{i}-of-{n}.done" for i in range(n)]


def get_store_init(wildcards):
    # several shards write one store: create it first, once, so they never race to
    if int(wildcards.n) > 1:
        return [f"results/{wildcards.ds}/cache/{wildcards.backbone}/{wildcards.tag}.init"]
    return []


def experiment(name):
    return _need("experiments", name)


def is_live(exp_name):
    return experiment(exp_name).get("method", "iisan") in LIVE_METHODS


def get_train_inputs(wildcards):
    """Caches for cached methods; the backbones themselves for methods that run them in the loop."""
    exp = experiment(wildcards.exp)
    towers = [t for t in ("text", "image") if t in exp]
    if is_live(wildcards.exp):
        return {f"{t}_backbone": tiny_stamp(exp[t]["backbone"]) for t in towers}
    return {t: cache_path(wildcards.ds, exp[t], ".done") for t in towers}


def train_code(wildcards):
    return code_hash("train_live" if is_live(wildcards.exp) else "train")


def train_settings(wildcards):
    exp = experiment(wildcards.exp)
    s = dict(config.get("train_defaults", {}))
    s.update(_need("datasets", wildcards.ds).get("train", {}))
    s.update(exp.get("train", {}))
    s["method"] = exp.get("method", "iisan")
    return json.dumps(s, sort_keys=True)


def item_flags(wildcards):
    """How `iisan train` reads items: --{t}-cache stores, or --{t}-backbone/--{t}-layers specs."""
    exp = experiment(wildcards.exp)
    flags = []
    for t in ("text", "image"):
        if t not in exp:
            continue
        if is_live(wildcards.exp):
            flags += [f"--{t}-backbone", shlex.quote(backbone_json(exp[t]["backbone"])),
                      f"--{t}-layers", shlex.quote(json.dumps(tower_layers(exp[t]), sort_keys=True))]
        else:
            flags += [f"--{t}-cache", cache_path(wildcards.ds, exp[t], ".zarr")]
    return " ".join(flags)


def target_runs(target):
    t = _need("targets", target)
    return [(ds, e) for ds in t["datasets"] for e in t["experiments"]]


def get_report_inputs(wildcards):
    return [f"results/{ds}/{e}/metrics.json" for ds, e in target_runs(wildcards.target)]


def report_experiments(wildcards):
    out = {}
    for ds, e in target_runs(wildcards.target):
        exp = experiment(e)
        text = exp.get("text", {}).get("backbone")
        out.setdefault(ds, {})[e] = {"group": exp.get("group", "main"), "label": exp.get("label", e), "text_backbone": text,
                                     "text_params_b": config["backbones"].get(text, {}).get("params_b") if text else None}
    return json.dumps(out, sort_keys=True)
