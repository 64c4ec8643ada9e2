"""Every path, input and flag the Snakemake rules use, computed from the validated
config, so they are unit-tested here rather than found out in a DAG.

``workflow/rules/common.smk`` makes one ``Workflow(config)`` and its ``get_*``
input functions only call it. Nothing here imports torch: this runs while
Snakemake builds the DAG.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from iisan.core.provenance import code_hash
from iisan.data.fields import FIELDS
from iisan.data.images import listing_fingerprint
from iisan.extract.layerdrop import spec_tag
from iisan.pipeline.config import pipeline_only
from iisan.pipeline.runs import experiment_runs, is_multi, run_named
from iisan.train import methods
from iisan.train.settings import from_settings

TOWERS = ("text", "image")


def names_regex(names) -> str:
    """A wildcard constraint matching exactly these names (none: matching nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def _spec_json(entry: dict, section: str) -> str:
    """A config entry as the JSON a command receives (pipeline-only keys removed)."""
    spec = {k: v for k, v in entry.items() if k not in pipeline_only(section)}
    if spec.get("max_memory"):  # YAML gives GPU ids as ints; JSON keys are strings (iisan turns them back)
        spec["max_memory"] = {str(k): v for k, v in spec["max_memory"].items()}
    return json.dumps(spec, sort_keys=True)


class Workflow:
    """The rules' view of one validated config."""

    def __init__(self, config: dict):
        self.config = config

    # --- data

    def final_output(self) -> list[str]:
        return [f"results/report/{self.config['default_target']}/summary.json"]

    def raw_format(self, ds: str) -> str:
        d = self.config["datasets"][ds]
        return d["synth"]["format"] if "synth" in d else d["format"]

    def raw_files(self, ds: str) -> dict:
        """The raw items, users, images and frames of a dataset (generated ones under results/{ds}/raw)."""
        d = self.config["datasets"][ds]
        if "synth" not in d:
            return {"items": d["items"], "users": d["users"], "images": d["images"], "frames": d["frames"]}
        root = f"results/{ds}/raw"
        if self.raw_format(ds) == "microlens":  # the layout iisan.data.microlens.synthesize_microlens writes
            return {"items": f"{root}/MicroLens-100k_title_en.csv", "users": f"{root}/MicroLens-100k_pairs.tsv",
                    "images": f"{root}/MicroLens-100k_covers.zip",
                    "frames": f"{root}/MicroLens-100k_frames.zip"}  # fmt: skip
        return {"items": f"{root}/{ds}_items.tsv", "users": f"{root}/am_{ds}_users.tsv", "images": f"{root}/images",
                "frames": None}  # fmt: skip

    def synth_names(self, fmt: str) -> str:
        return names_regex(
            [ds for ds, d in self.config["datasets"].items() if "synth" in d and self.raw_format(ds) == fmt]
        )

    def raw_inputs(self, ds: str) -> dict:
        f = self.raw_files(ds)
        return {"items_tsv": f["items"], "users_tsv": f["users"]}

    def prepare_settings(self, ds: str) -> dict:
        """Only what preparation reads: a dataset's `train` settings must not rerun it."""
        d = self.config["datasets"][ds]
        keys = ("missing_images", "encoding", "min_seq_len", "max_seq_len", "truncate")
        return {**{k: d[k] for k in keys}, "format": self.raw_format(ds)}

    def images_flag(self, ds: str) -> str:
        images = self.raw_files(ds)["images"]
        return f"--images {shlex.quote(images)}" if images else ""

    def user_listing(self, ds: str, key: str) -> str | None:
        """A user's images or frames are no job's output, so Snakemake sees changes to them through this param."""
        d = self.config["datasets"][ds]
        return listing_fingerprint(d[key]) if "synth" not in d and d[key] else None

    # --- captions

    def captioner_json(self, ds: str, source: str) -> str:
        return _spec_json(self.config["datasets"][ds]["captions"][source], "captioner")

    def captioner_inputs(self, ds: str, source: str) -> list[str]:
        c = self.config["datasets"][ds]["captions"][source]
        return [f"results/backbones/{Path(c['model']).name}/iisan-tiny.json"] if c.get("tiny") else []

    def caption_frames_inputs(self, ds: str, source: str) -> list[str]:
        generated = "synth" in self.config["datasets"][ds]
        return [self.raw_files(ds)["frames"]] if source == "video" and generated else []

    def frames_flag(self, ds: str, source: str) -> str:
        frames = self.raw_files(ds)["frames"]
        return f"--frames {shlex.quote(frames)}" if source == "video" and frames else ""

    def frames_listing(self, ds: str, source: str) -> str | None:
        return self.user_listing(ds, "frames") if source == "video" else None

    # --- caches

    def backbone_json(self, name: str) -> str:
        """The backbone spec `iisan extract` and `iisan train` receive."""
        return _spec_json(self.config["backbones"][name], "backbone")

    @staticmethod
    def tower_tag(tower: dict) -> str:
        """A cache's name: the layer spec's tag, after the caption field it reads if any."""
        field = tower["field"]
        return spec_tag(tower["layers"]) if not FIELDS[field].caption_source else f"{field}-{spec_tag(tower['layers'])}"

    @staticmethod
    def store(ds: str, backbone: str, tag: str, suffix: str = ".zarr") -> str:
        """A cache's files: the store (``.zarr``), its completion file (``.done``), shards, init marker."""
        return f"results/{ds}/cache/{backbone}/{tag}{suffix}"

    def cache_path(self, ds: str, tower: dict, suffix: str) -> str:
        return self.store(ds, tower["backbone"], self.tower_tag(tower), suffix)

    def tower_for(self, backbone: str, tag: str) -> dict:
        """A tower whose cache this is (any experiment using it gives the same spec and field)."""
        for exp in self.config["experiments"].values():
            for t in TOWERS:
                tower = exp.get(t)
                if tower and tower["backbone"] == backbone and self.tower_tag(tower) == tag:
                    return tower
        raise ValueError(f"no experiment reads cache {tag!r} of backbone {backbone!r}")

    def layers_json(self, backbone: str, tag: str) -> str:
        return json.dumps(self.tower_for(backbone, tag)["layers"], sort_keys=True)

    def caption_source(self, backbone: str, tag: str) -> str | None:
        return FIELDS[self.tower_for(backbone, tag)["field"]].caption_source

    def captions_dir(self, ds: str, backbone: str, tag: str) -> str | None:
        source = self.caption_source(backbone, tag)
        return f"results/{ds}/captions/{source}" if source else None

    def caption_inputs(self, ds: str, backbone: str, tag: str) -> dict:
        folder = self.captions_dir(ds, backbone, tag)
        return {"captions": folder} if folder else {}

    def captions_flag(self, ds: str, backbone: str, tag: str) -> str:
        folder = self.captions_dir(ds, backbone, tag)
        return f"--captions {folder}" if folder else ""

    def tiny_stamp(self, backbone: str) -> list[str]:
        """A tiny backbone is built by the pipeline; real ones come from the hub cache."""
        return [f"results/backbones/{backbone}/iisan-tiny.json"] if self.config["backbones"][backbone]["tiny"] else []

    def shard_outputs(self, ds: str, backbone: str, tag: str) -> list[str]:
        n = self.config["backbones"][backbone]["shards"]
        return [self.store(ds, backbone, tag, f".shards/{i}-of-{n}.done") for i in range(n)]

    def store_init(self, ds: str, backbone: str, tag: str, n: int) -> list[str]:
        # several shards write one store: create it first, once, so they never race to
        return [self.store(ds, backbone, tag, ".init")] if int(n) > 1 else []

    # --- training

    def method_of(self, exp: str) -> methods.Method:
        return methods.get(self.config["experiments"][exp]["method"])

    def towers(self, exp: str) -> dict:
        e = self.config["experiments"][exp]
        return {t: e[t] for t in TOWERS if t in e}

    def train_inputs(self, ds: str, exp: str) -> dict:
        """Caches for cached methods; the backbones themselves for methods that run them in the loop."""
        if self.method_of(exp).needs_cache:
            return {t: self.cache_path(ds, tower, ".done") for t, tower in self.towers(exp).items()}
        out = {f"{t}_backbone": self.tiny_stamp(tower["backbone"]) for t, tower in self.towers(exp).items()}
        return out | {f"{t}_captions": folder for t, folder in self.tower_captions(ds, exp).items()}

    def tower_captions(self, ds: str, exp: str) -> dict[str, str]:
        """The caption folders the towers of a method that runs backbones read (none for titles and images)."""
        sources = {t: FIELDS[tower["field"]].caption_source for t, tower in self.towers(exp).items()}
        return {t: f"results/{ds}/captions/{s}" for t, s in sources.items() if s}

    def train_code(self, exp: str, stage: str = "train") -> str:
        return code_hash(stage, self.method_of(exp))

    def run_names(self, multi: bool) -> str:
        """Experiments whose metrics.json aggregates several runs (``multi``), or is one run's."""
        return names_regex([e for e in self.config["experiments"] if is_multi(self.config, e) == multi])

    def train_settings(self, ds: str, exp: str, run: str | None = None) -> str:
        """A run's settings; without a run (profile), the experiment's first run's."""
        r = run_named(self.config, ds, exp, run) if run is not None else experiment_runs(self.config, ds, exp)[0]
        return json.dumps(r.settings, sort_keys=True)

    def run_tags(self, ds: str, exp: str, run: str | None = None) -> str:
        """What a tracked run is labelled with (iisan.core.tracking): dataset, experiment, run, grid point, seed."""
        r = run_named(self.config, ds, exp, run) if run is not None else experiment_runs(self.config, ds, exp)[0]
        return json.dumps({"dataset": ds, "experiment": exp, "run": run or exp, "point": r.point, "seed": r.seed},
                          sort_keys=True)  # fmt: skip

    def run_folders(self, ds: str, exp: str) -> list[tuple[str, object]]:
        """(folder, run) of each run of a multi-run experiment."""
        return [(f"results/{ds}/{exp}/{r.name}", r) for r in experiment_runs(self.config, ds, exp)]

    def run_outputs(self, ds: str, exp: str) -> list[str]:
        return [f"{d}/metrics.json" for d, _ in self.run_folders(ds, exp)]

    def aggregate_runs(self, ds: str, exp: str) -> str:
        runs = [{"dir": d, "point": r.point, "seed": r.seed} for d, r in self.run_folders(ds, exp)]
        return json.dumps(runs, sort_keys=True)

    def item_flags(self, ds: str, exp: str) -> str:
        """How `iisan train` reads items: --{t}-cache stores, or --{t}-backbone/--{t}-layers specs."""
        flags = []
        for t, tower in self.towers(exp).items():
            if self.method_of(exp).needs_cache:
                flags += [f"--{t}-cache", self.cache_path(ds, tower, ".zarr")]
            else:
                flags += [f"--{t}-backbone", shlex.quote(self.backbone_json(tower["backbone"])),
                          f"--{t}-layers", shlex.quote(json.dumps(tower["layers"], sort_keys=True))]  # fmt: skip
                if t in (captions := self.tower_captions(ds, exp)):
                    flags += [f"--{t}-captions", captions[t]]
        return " ".join(flags)

    def metric_k(self, ds: str, exp: str) -> int:
        """The experiment's HR@k cut-off, which `recommend` lists by default."""
        return from_settings(experiment_runs(self.config, ds, exp)[0].settings)[1].metric_k

    # --- reports

    def target_names(self, batch_sizes: bool) -> str:
        """Targets that are time-and-memory studies (``batch_sizes``), or quality reports."""
        return names_regex([t for t, v in self.config["targets"].items() if bool(v.get("batch_sizes")) == batch_sizes])

    def target_runs(self, target: str) -> list[tuple[str, str]]:
        """(dataset, experiment) of a target's runs: its datasets x experiments, then those of the quality
        targets it includes, each once."""
        t = self.config["targets"][target]
        runs = [(ds, e) for ds in t.get("datasets", []) for e in t.get("experiments", [])]
        for inc in t.get("include", []):
            if not self.config["targets"][inc].get("batch_sizes"):
                runs += self.target_runs(inc)
        return list(dict.fromkeys(runs))

    def report_inputs(self, target: str) -> list[str]:
        t = self.config["targets"][target]
        if t.get("batch_sizes"):  # a time-and-memory study
            return [f"results/{ds}/{e}/profile/bs-{b}.steps-{t['steps']}.json" for ds, e in self.target_runs(target)
                    for b in t["batch_sizes"]]  # fmt: skip
        runs = [f"results/{ds}/{e}/metrics.json" for ds, e in self.target_runs(target)]
        return runs + [f"results/report/{inc}/summary.json" for inc in t.get("include", [])]

    def report_metrics(self) -> str:
        """config.yaml's ``metrics:``: a report param, so a new metric reruns the reports alone."""
        return json.dumps(self.config["metrics"], sort_keys=True)

    def report_experiments(self, target: str) -> str:
        out = {}
        for ds, e in self.target_runs(target):
            exp = self.config["experiments"][e]
            text = exp.get("text", {}).get("backbone")
            params_b = self.config["backbones"][text]["params_b"] if text else None
            layers = spec_tag(exp["text"]["layers"]) if text else None
            out.setdefault(ds, {})[e] = {"group": exp["group"], "label": exp.get("label", e), "text_backbone": text,
                                         "text_params_b": params_b, "text_layers": layers}  # fmt: skip
        return json.dumps(out, sort_keys=True)
