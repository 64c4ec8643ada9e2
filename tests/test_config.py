"""One place per idea: the method registry, the schema against the dataclasses,
config validation with dotted keys, and stage code found from the import graph."""

import ast
import copy
import dataclasses
import re

import pytest
import yaml

from iisan import methods
from iisan.backbones import BackboneSpec
from iisan.config import PIPELINE_ONLY, schema, validate
from iisan.errors import ConfigError, ConfigValidationError
from iisan.model import ItemEncoder
from iisan.peft_baselines import PEFTConfig
from iisan.provenance import closure, stage_modules
from iisan.settings import ModelConfig, TrainConfig, from_settings, setting_names

from conftest import REPO, merged_config


def test_method_names_are_listed_only_in_the_registry():
    names = set(methods.METHODS) - {"iisan"}  # "iisan" is also the package's name (logger, program)
    strays = []
    for path in sorted((REPO / "iisan").glob("*.py")):
        if path.name == "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                strays.append(f"{path.name}:{node.lineno}: {node.value!r}")
    alternatives = "|".join(sorted(names))
    quoted = re.compile(rf"""["']({alternatives})["']""")
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow").rglob("*.smk"))]:
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if quoted.search(line):
                strays.append(f"{path.name}:{no}: {line.strip()}")

    def enums(node):
        if isinstance(node, dict):
            yield from ([node["enum"]] if "enum" in node else [])
            for v in node.values():
                yield from enums(v)
        elif isinstance(node, list):
            for v in node:
                yield from enums(v)

    raw_schema = yaml.safe_load((REPO / "iisan/config.schema.yaml").read_text())
    strays += [f"config.schema.yaml enum {e}" for e in enums(raw_schema) if set(e) & set(methods.METHODS)]
    assert not strays, strays


def test_registry_entries_resolve_to_item_encoders_and_sources():
    for m in methods.METHODS.values():
        assert issubclass(methods.load(m.item_encoder), ItemEncoder), m.name
        assert callable(methods.load(m.sources)) and callable(methods.load(m.user_encoder)), m.name
    assert schema()["properties"]["experiments"]["additionalProperties"]["properties"]["method"]["enum"] == list(
        methods.METHODS
    )
    with pytest.raises(ConfigError, match="method 'bert' is not one of"):
        methods.get("bert")


def test_schema_keys_equal_the_dataclass_fields():
    s = schema()
    model_keys, train_keys = setting_names()
    assert set(s["$defs"]["train"]["properties"]) | {"method"} == model_keys | train_keys
    assert not model_keys & train_keys
    assert set(s["$defs"]["train"]["properties"]["peft"]["properties"]) == {
        f.name for f in dataclasses.fields(PEFTConfig)
    }
    backbone = set(s["properties"]["backbones"]["additionalProperties"]["properties"])
    assert backbone == {f.name for f in dataclasses.fields(BackboneSpec)} | set(PIPELINE_ONLY)
    from iisan.caption import CaptionSpec

    captioner = s["$defs"]["captioner"]["properties"]
    assert set(captioner) == {f.name for f in dataclasses.fields(CaptionSpec)} | {"tiny"}
    for f in dataclasses.fields(CaptionSpec):  # model is required; the prompt's default depends on the source
        assert f.name in ("model", "prompt") or captioner[f.name]["default"] == f.default, f.name
    # and the defaults agree
    train_defaults = {k: v["default"] for k, v in s["$defs"]["train"]["properties"].items()}
    peft_defaults = train_defaults.pop("peft")
    mc, tc = ModelConfig(), TrainConfig()
    for k, v in train_defaults.items():
        assert getattr(mc if k in model_keys else tc, k) == v, k
    assert peft_defaults == {} and dataclasses.asdict(PEFTConfig()) == {
        k: v["default"] for k, v in s["$defs"]["train"]["properties"]["peft"]["properties"].items()
    }


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_the_shipped_config_and_scenarios_validate(config):
    validate(copy.deepcopy(config))
    for scenario in sorted((REPO / ".test").glob("*/config.yaml")):
        validate(merged_config(scenario))


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda c: c["backbones"]["tiny-bert"].update(max_text_length=20),
            r"config\.backbones\.tiny-bert: unknown key\(s\) \['max_text_length'\]",
        ),
        (
            lambda c: c["train_defaults"].update(batchsize=8),
            r"config\.train_defaults: unknown key\(s\) \['batchsize'\]",
        ),
        (
            lambda c: c["datasets"]["demo"]["train"].update(batchsize=8),
            r"config\.datasets\.demo\.train: unknown key\(s\) \['batchsize'\]",
        ),
        (
            lambda c: c["experiments"]["vs_tiny"].setdefault("train", {}).update(batchsize=8),
            r"config\.experiments\.vs_tiny\.train: unknown key\(s\) \['batchsize'\]",
        ),
        (lambda c: c["experiments"]["vs_tiny"].update(method="bert"), r"`method`='bert'"),
        (lambda c: c["experiments"]["vs_tiny"].setdefault("train", {}).update(lr=-1), r"`lr`=-1"),
        (
            lambda c: c["experiments"]["vs_tiny"].setdefault("train", {}).update(d=63),
            r"`d`=63 must be divisible by `heads`=2",
        ),
        (lambda c: c["datasets"]["demo"].update(min_seq_len=2), r"config\.datasets\.demo: `min_seq_len`=2"),
        (
            lambda c: c["targets"]["demo"]["experiments"].append("nope"),
            r"targets\.demo\.experiments\[12\]='nope' is not a key of `experiments`",
        ),
        (
            lambda c: c["experiments"]["vs_tiny"]["image"].update(backbone="tiny-bert"),
            r"experiments\.vs_tiny\.image\.backbone='tiny-bert' is a text backbone",
        ),
        (
            lambda c: c["experiments"]["popularity"].update(text={"backbone": "tiny-bert"}),
            r"method 'pop' reads no item content",
        ),
    ],
)
def test_bad_config_is_rejected_before_any_job_with_the_dotted_key(config, edit, match):
    c = copy.deepcopy(config)
    edit(c)
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_a_dataset_train_setting_is_not_overridden_by_defaults(config):
    from iisan.config import merged_settings

    c = validate(copy.deepcopy(config))
    assert merged_settings(c, "demo", "vs_tiny")["lr"] == config["datasets"]["demo"]["train"]["lr"]
    assert merged_settings(c, "demo", "fft_tiny")["epochs"] == 3  # the experiment wins over the dataset


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"epochs": "3"}, r"`epochs`='3': '3' is not of type 'integer'"),
        ({"batch_size": 1}, r"`batch_size`=1: 1 is less than the minimum of 2"),
        ({"lr": -1e-3}, r"`lr`=-0\.001"),
        ({"peft": {"r": 4}}, r"--settings\.peft: unknown key\(s\) \['r'\]"),
        ({"device": "gpu"}, r"`device`='gpu'"),
    ],
)
def test_command_line_settings_get_the_same_validation(settings, match):
    with pytest.raises(ConfigValidationError, match=match):
        from_settings(settings)


def test_stage_code_comes_from_the_import_graph():
    # uncached IISAN selects layers in the loop; the hand-kept list once missed this
    assert "iisan.layerdrop" in stage_modules("train", "uncached")
    # cached IISAN never runs a backbone, so editing backbones.py reruns none of its runs
    assert "iisan.backbones" not in stage_modules("train", "iisan")
    assert "iisan.peft_baselines" in stage_modules("train", "lora") and "iisan.peft_baselines" not in stage_modules(
        "train", "uncached"
    )
    # imports inside functions count (the CLI imports each command's modules lazily)
    assert {"iisan.train", "iisan.extract", "iisan.report"} <= set(closure(["iisan.cli"]))
