"""The pipeline configuration: its schema, validation with defaults, and the
cross-references a schema cannot express. Errors name the dotted key.

The schema (``config.schema.yaml`` beside this file) is the one statement of
what a setting may be: the Snakefile validates config.yaml with it, and
``iisan train`` / ``iisan prepare`` validate their command-line settings
against the same definitions. The method names come from the registry.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from iisan.errors import ConfigError, ConfigValidationError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
RESERVED = ("cache", "data", "raw", "captions")  # folders in results/{dataset}/ that are not experiments
PIPELINE_ONLY = ("tiny", "shards", "params_b")  # backbone keys for the workflow, not for iisan.backbones.BackboneSpec


@functools.cache
def _schema() -> dict:
    import yaml

    from iisan.cache import CHUNK_ITEMS
    from iisan.methods import METHODS

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    schema["properties"]["experiments"]["additionalProperties"]["properties"]["method"]["enum"] = list(METHODS)
    schema["properties"]["extract"]["properties"]["chunk_items"]["default"] = CHUNK_ITEMS
    return schema


def schema() -> dict:
    """The config schema, with the registry's method names filled in."""
    return copy.deepcopy(_schema())


def _validator(sub: dict | None = None, defaults: bool = True):
    """A Draft 2020-12 validator that also fills in defaults (jsonschema's FAQ recipe)."""
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator
    props = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for key, spec in properties.items():
                if "default" in spec and key not in instance:
                    instance[key] = copy.deepcopy(spec["default"])
        yield from props(validator, properties, instance, sch)

    cls = validators.extend(base, {"properties": set_defaults}) if defaults else base
    root = _schema()
    return cls(root if sub is None else {**sub, "$defs": root["$defs"]})


def _dotted(path, root: str) -> str:
    return ".".join([root, *(str(p) for p in path)]) if path else root


def _check(validator, instance, root: str) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(instance))
    if error is None:
        return
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":  # name the unknown key(s) and what is known
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        where = _dotted(path, root)
        raise ConfigValidationError(
            f"{where}: unknown key(s) {unknown}; known: {known}\n  fix: correct the spelling or remove them"
        )
    key = f"`{path[-1]}`={error.instance!r}: " if path else ""
    where = _dotted(path[:-1], root)
    raise ConfigValidationError(
        f"{where}: {key}{error.message}\n  fix: see `{_dotted(path, root)}` in {SCHEMA_PATH.name}"
    )


def check_section(name: str, value: dict, root: str, extra: dict | None = None) -> dict:
    """Validate ``value`` against ``$defs/<name>`` (plus ``extra`` properties); fills
    defaults into a copy and returns it. ``root`` names it in errors (e.g. ``--settings``)."""
    sub = copy.deepcopy(_schema()["$defs"][name])
    if extra:
        sub["properties"] = {**sub.get("properties", {}), **extra}
    value = copy.deepcopy(value)
    _check(_validator(sub), value, root)
    return value


def method_property() -> dict:
    return _schema()["properties"]["experiments"]["additionalProperties"]["properties"]["method"]


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
    _check(_validator(), config, "config")
    for (section, name), train in sparse.items():
        config[section][name]["train"] = train
    _cross_check(config)
    return config


def _need(config, section, key, where):
    if key not in config[section]:
        raise ConfigError(f"{where}={key!r} is not a key of `{section}`; known: {sorted(config[section])}")
    return config[section][key]


def _cross_check(config: dict) -> None:
    from iisan.methods import METHODS

    for name, exp in config["experiments"].items():
        if name in RESERVED:
            raise ConfigError(
                f"experiments.{name}: {RESERVED} name folders of a dataset; call the experiment otherwise"
            )
        method = METHODS[exp["method"]]
        for tower in ("text", "image"):
            if tower not in exp:
                continue
            where = f"experiments.{name}.{tower}.backbone"
            b = _need(config, "backbones", exp[tower]["backbone"], where)
            field = exp[tower].setdefault("field", "title" if tower == "text" else "image")
            kind = "image" if field == "image" else "text"
            if b["modality"] != kind:
                raise ConfigError(
                    f"{where}={exp[tower]['backbone']!r} is a {b['modality']} backbone; the tower reads "
                    f"`field: {field}`, which needs a {kind} one"
                )
            if field.endswith("_caption") and not method.needs_cache:
                raise ConfigError(f"experiments.{name}.{tower}.field={field!r}: captions are read from caches; "
                                  f"method {method.name!r} runs backbones on titles and images only")  # fmt: skip
        has_tower = "text" in exp or "image" in exp
        if method.needs_content and not has_tower:
            raise ConfigError(f"experiments.{name} needs a `text` and/or `image` tower for method {method.name!r}")
        if not method.needs_content and has_tower:
            raise ConfigError(f"experiments.{name}: method {method.name!r} reads no item content; remove its towers")
    for t, target in config["targets"].items():
        for i, ds in enumerate(target["datasets"]):
            _need(config, "datasets", ds, f"targets.{t}.datasets[{i}]")
            for e in target["experiments"]:
                for tower in ("text", "image"):
                    field = config["experiments"].get(e, {}).get(tower, {}).get("field", "")
                    source = field.removesuffix("_caption")
                    if field.endswith("_caption") and source not in config["datasets"][ds]["captions"]:
                        raise ConfigError(f"targets.{t}: experiment {e} reads {field} of dataset {ds}, which "
                                          f"defines no `captions: {{{source}: {{model: ...}}}}`")  # fmt: skip
        for i, e in enumerate(target["experiments"]):
            _need(config, "experiments", e, f"targets.{t}.experiments[{i}]")
    _need(config, "targets", config["default_target"], "default_target")
    for ds, d in config["datasets"].items():
        for key in ("items", "users"):
            if "synth" in d and key in d:
                raise ConfigError(f"datasets.{ds}: give `synth` or `items`/`users`, not both")
    # the effective train settings of every run must be valid together
    from iisan.runs import experiment_runs

    train_keys = sorted(_schema()["$defs"]["train"]["properties"])
    for name, exp in config["experiments"].items():
        for key in exp.get("grid", {}):
            if key not in train_keys:
                raise ConfigError(f"experiments.{name}.grid: {key!r} is not a train setting; known: {train_keys}")
    for ds in config["datasets"]:
        for name in config["experiments"]:
            for run in experiment_runs(config, ds, name):
                where = f"datasets.{ds}.train + experiments.{name}" + (f" (run {run.name})" if run.name else ".train")
                check_settings(run.settings, where)


def merged_settings(config: dict, ds: str, exp: str) -> dict:
    """train_defaults, then the dataset's train, then the experiment's (last wins), plus its method."""
    s = dict(config.get("train_defaults", {}))
    s.update(config["datasets"][ds].get("train", {}))
    e = config["experiments"][exp]
    s.update(e.get("train", {}))
    s["method"] = e.get("method", "iisan")
    return s


def check_settings(settings: dict, root: str = "--settings") -> dict:
    """Training settings (the schema's `train` plus `method`), validated, defaults filled."""
    value = check_section("train", settings, root, extra={"method": method_property()})
    if value["d"] % value["heads"]:
        raise ConfigError(f"{root}: `d`={value['d']} must be divisible by `heads`={value['heads']}")
    return value
