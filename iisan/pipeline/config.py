"""The pipeline configuration: its schema, validation with defaults, and the
cross-references a schema cannot express. Errors name the dotted key.

``config.schema.yaml`` beside this file states config.yaml's structure; the
settings inside it (a run's ``train``, a ``backbones`` or ``captions`` entry, a
dataset's preparation, a layer selection, the method) are derived from the
stages' dataclasses, which the command line validates against too, so each
setting is stated once. The Snakefile validates config.yaml with ``validate``.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from iisan.core.errors import ConfigError
from iisan.core.schema import check, schema_of
from iisan.core.tracking import TrackingSettings
from iisan.data.fields import DEFAULT_FIELD, FIELDS
from iisan.data.prepare import PrepareSettings
from iisan.extract.cache import CHUNK_ITEMS
from iisan.extract.layerdrop import LayerSpec, select_layers
from iisan.extract.specs import BackboneSpec, CaptionSpec
from iisan.pipeline.runs import experiment_runs
from iisan.results.metrics import MetricSettings
from iisan.train import settings as train_settings
from iisan.train.methods import METHODS

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
RESERVED = ("cache", "data", "raw", "captions")  # folders in results/{dataset}/ that are not experiments


def _with(schema: dict, extra: dict) -> dict:
    """``schema`` with the pipeline-only properties of ``extra`` added."""
    return {**schema, "properties": {**schema["properties"], **extra["properties"]}}


@functools.cache
def _schema() -> dict:
    import yaml

    s = yaml.safe_load(SCHEMA_PATH.read_text())
    defs = s["$defs"]
    run = train_settings.schema()
    defs["method"] = run["properties"].pop("method")
    s["properties"]["experiments"]["additionalProperties"]["properties"]["method"] = defs["method"]  # its default
    defs["train"] = run  # a section's train settings: everything but the method, which the experiment names
    defs["backbone"] = _with(schema_of(BackboneSpec), defs.pop("backbone_pipeline"))
    defs["captioner"] = _with(schema_of(CaptionSpec), defs.pop("captioner_pipeline"))
    defs["layer_spec"] = schema_of(LayerSpec)
    s["properties"]["metrics"] = {**schema_of(MetricSettings), "default": {}}
    s["properties"]["tracking"] = {**schema_of(TrackingSettings), "default": {}}
    defs["tower"]["properties"]["field"]["enum"] = list(FIELDS)
    dataset = s["properties"]["datasets"]["additionalProperties"]
    dataset["properties"].update(schema_of(PrepareSettings)["properties"])
    s["properties"]["extract"]["properties"]["chunk_items"]["default"] = CHUNK_ITEMS
    return s


def schema() -> dict:
    """config.yaml's schema, with every stage's settings filled in."""
    return copy.deepcopy(_schema())


def pipeline_only(section: str) -> tuple[str, ...]:
    """Keys of a ``backbones``/``captions`` entry that are for the workflow, not for iisan's commands."""
    spec = {"backbone": BackboneSpec, "captioner": CaptionSpec}[section]
    return tuple(sorted(set(_schema()["$defs"][section]["properties"]) - set(schema_of(spec)["properties"])))


def validate(config: dict) -> dict:
    """Validate a whole config in place: schema (with defaults), then cross-references.

    A dataset's or an experiment's ``train`` keeps only what the user wrote:
    filled-in defaults there would override ``train_defaults`` when merged."""
    sparse = {
        (section, name): copy.deepcopy(entry.get("train", {}))
        for section in ("datasets", "experiments")
        for name, entry in (config.get(section) or {}).items()
        if isinstance(entry, dict)
    }
    checked = check(_schema(), config, "config", schema_name=SCHEMA_PATH.name)
    config.clear()
    config.update(checked)
    for (section, name), train in sparse.items():
        config[section][name]["train"] = train
    _cross_check(config)
    return config


def _need(config, section, key, where):
    if key not in config[section]:
        raise ConfigError(f"{where}={key!r} is not a key of `{section}`; known: {sorted(config[section])}")
    return config[section][key]


def _check_experiment(config: dict, name: str, exp: dict) -> None:
    if name in RESERVED:
        raise ConfigError(f"experiments.{name}: {RESERVED} name folders of a dataset; call the experiment otherwise")
    method = METHODS[exp["method"]]
    for tower in ("text", "image"):
        if tower not in exp:
            continue
        where = f"experiments.{name}.{tower}.backbone"
        b = _need(config, "backbones", exp[tower]["backbone"], where)
        field = exp[tower].setdefault("field", DEFAULT_FIELD[tower])
        kind = FIELDS[field].modality
        if b["modality"] != kind:
            raise ConfigError(
                f"{where}={exp[tower]['backbone']!r} is a {b['modality']} backbone; the tower reads "
                f"`field: {field}`, which needs a {kind} one"
            )
    has_tower = "text" in exp or "image" in exp
    if method.needs_content and not has_tower:
        raise ConfigError(f"experiments.{name} needs a `text` and/or `image` tower for method {method.name!r}")
    if not method.needs_content and has_tower:
        raise ConfigError(f"experiments.{name}: method {method.name!r} reads no item content; remove its towers")
    _check_taps(config, name, exp, method)
    train_keys = sorted(_schema()["$defs"]["train"]["properties"])
    for key in exp.get("grid", {}):
        if key not in train_keys:
            raise ConfigError(f"experiments.{name}.grid: {key!r} is not a train setting; known: {train_keys}")


def _check_taps(config: dict, name: str, exp: dict, method) -> None:
    """The SAN's towers pair their taps one to one unless ``allow_unequal_taps``: caught here, before
    any extraction, when both backbones state ``n_layers`` (training checks it again from the caches)."""
    if "san:" not in method.item_encoder or "text" not in exp or "image" not in exp:
        return
    n = {t: config["backbones"][exp[t]["backbone"]]["n_layers"] for t in ("text", "image")}
    if None in n.values():
        return
    taps = {t: len(select_layers(n[t], exp[t]["layers"])) for t in n}
    allowed = {**config.get("train_defaults", {}), **exp.get("train", {})}.get("allow_unequal_taps", False)
    if taps["text"] != taps["image"] and not allowed:
        raise ConfigError(
            f"experiments.{name}: the text tower taps {taps['text']} layers of {exp['text']['backbone']} and the "
            f"image tower {taps['image']} of {exp['image']['backbone']}; the paper pairs them one to one. Give "
            f"both the same count (e.g. `layers: {{n: {taps['image'] - 1}}}` on the text tower), or set "
            "`train: {allow_unequal_taps: true}` to pair the top taps (Table VIII's 24+12 and 12+6 rows)"
        )


def _check_target(config: dict, t: str, target: dict) -> None:
    for i, inc in enumerate(target.get("include", [])):
        _need(config, "targets", inc, f"targets.{t}.include[{i}]")
    if target.get("batch_sizes") and target.get("include"):
        raise ConfigError(f"targets.{t}: a time-and-memory study (batch_sizes) cannot `include` other targets")
    seen, todo = set(), list(target.get("include", []))
    while todo:
        inc = todo.pop()
        if inc == t:
            raise ConfigError(f"targets.{t}.include: the target includes itself (through {sorted(seen) or [t]})")
        if inc not in seen:
            seen.add(inc)
            todo += config["targets"].get(inc, {}).get("include", [])
    for i, ds in enumerate(target.get("datasets", [])):
        _need(config, "datasets", ds, f"targets.{t}.datasets[{i}]")
        for e in target["experiments"]:
            for tower in ("text", "image"):
                source = FIELDS[config["experiments"].get(e, {}).get(tower, {}).get("field", "title")].caption_source
                if source and source not in config["datasets"][ds]["captions"]:
                    raise ConfigError(f"targets.{t}: experiment {e} reads {source}_caption of dataset {ds}, which "
                                      f"defines no `captions: {{{source}: {{model: ...}}}}`")  # fmt: skip
    for i, e in enumerate(target.get("experiments", [])):
        _need(config, "experiments", e, f"targets.{t}.experiments[{i}]")


def _cross_check(config: dict) -> None:
    for name, exp in config["experiments"].items():
        _check_experiment(config, name, exp)
    for t, target in config["targets"].items():
        _check_target(config, t, target)
    _need(config, "targets", config["default_target"], "default_target")
    for ds, d in config["datasets"].items():
        if "synth" in d and ("items" in d or "users" in d):
            raise ConfigError(f"datasets.{ds}: give `synth` or `items`/`users`, not both")
    # the effective train settings of every run must be valid together
    for ds in config["datasets"]:
        for name in config["experiments"]:
            for run in experiment_runs(config, ds, name):
                where = f"datasets.{ds}.train + experiments.{name}" + (f" (run {run.name})" if run.name else ".train")
                train_settings.from_settings(run.settings, where)
