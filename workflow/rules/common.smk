# Input functions and config lookups. Anything bigger belongs in the iisan package.
import json

from iisan.layers import spec_tag
from iisan.provenance import code_hash


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
        if exp.get("method", "iisan") in ("iisan", "frozen") and not ("text" in exp or "image" in exp):
            raise ValueError(f"config.yaml: experiments.{name} needs a `text` and/or `image` tower for method {exp.get('method', 'iisan')!r}")
    for ds in config["default_target"]["datasets"]:
        _need("datasets", ds)
    for e in config["default_target"]["experiments"]:
        _need("experiments", e)


check_config()


def get_final_output():
    return ["results/report/summary.json"]


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


def get_backbone_inputs(wildcards):
    """A tiny backbone is built by the pipeline; real ones come from the hub cache."""
    b = _need("backbones", wildcards.backbone)
    return [f"results/backbones/{wildcards.backbone}/iisan-tiny.json"] if b.get("tiny") else []


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


def get_train_caches(wildcards):
    exp = experiment(wildcards.exp)
    return {t: cache_path(wildcards.ds, exp[t], ".done") for t in ("text", "image") if t in exp}


def train_settings(wildcards):
    exp = experiment(wildcards.exp)
    s = dict(config.get("train_defaults", {}))
    s.update(_need("datasets", wildcards.ds).get("train", {}))
    s.update(exp.get("train", {}))
    s["method"] = exp.get("method", "iisan")
    return json.dumps(s, sort_keys=True)


def cache_flags(wildcards):
    caches = get_train_caches(wildcards)
    return " ".join(f"--{t}-cache {cache_path(wildcards.ds, experiment(wildcards.exp)[t], '.zarr')}" for t in caches)


def target_runs():
    return [(ds, e) for ds in config["default_target"]["datasets"] for e in config["default_target"]["experiments"]]


def report_experiments():
    out = {}
    for ds, e in target_runs():
        exp = experiment(e)
        text = exp.get("text", {}).get("backbone")
        out.setdefault(ds, {})[e] = {"group": exp.get("group", "main"), "label": exp.get("label", e), "text_backbone": text,
                                     "text_params_b": config["backbones"].get(text, {}).get("params_b") if text else None}
    return json.dumps(out, sort_keys=True)
