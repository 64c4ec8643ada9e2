"""One place per idea: the method registry, the schema derived from the settings
dataclasses, config validation with dotted keys, and stage code found from the import graph."""

import ast
import copy
import dataclasses
import re
import typing

import pytest
import yaml

from iisan.core.errors import ConfigError, ConfigValidationError
from iisan.core.provenance import closure, stage_modules
from iisan.core.schema import fields, schema_of, setting
from iisan.extract.specs import BackboneSpec, CaptionSpec
from iisan.pipeline.config import SCHEMA_PATH, pipeline_only, schema, validate
from iisan.train import methods
from iisan.train import settings as train_settings
from iisan.train.model import ItemEncoder
from iisan.train.settings import ModelConfig, PEFTConfig, TrainConfig, from_settings

from conftest import REPO, merged_config


def test_method_names_are_listed_only_in_the_registry():
    names = set(methods.METHODS) - {"iisan"}  # "iisan" is also the package's name (logger, program)
    strays = []
    for path in sorted((REPO / "iisan").rglob("*.py")):
        if path == REPO / "iisan/train/methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                strays.append(f"{path.name}:{node.lineno}: {node.value!r}")
    alternatives = "|".join(sorted(names))
    quoted = re.compile(rf"""["']({alternatives})["']""")
    for path in [REPO / "workflow/Snakefile", *sorted((REPO / "workflow").rglob("*.smk"))]:
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

    raw_schema = yaml.safe_load(SCHEMA_PATH.read_text())
    strays += [f"config.schema.yaml enum {e}" for e in enums(raw_schema) if set(e) & set(methods.METHODS)]
    assert not strays, strays


def test_registry_entries_resolve_to_item_encoders_and_sources():
    for m in methods.METHODS.values():
        assert issubclass(methods.load(m.item_encoder), ItemEncoder), m.name
        assert callable(methods.load(m.sources)) and callable(methods.load(m.user_encoder)), m.name
    assert schema()["$defs"]["method"]["enum"] == list(methods.METHODS)
    with pytest.raises(ConfigError, match="method 'bert' is not one of"):
        methods.get("bert")


@dataclasses.dataclass
class _Example:
    """An example."""

    name: str = setting(description="required: no default")
    kind: typing.Literal["a", "b"] = setting("a", "an enum from a Literal")
    size: int | None = setting(None, "optional", minimum=1)
    rate: float = setting(0.5, "with limits", exclusiveMinimum=0, maximum=1)
    tags: list = setting(factory=list, description="a factory default", items={"type": "string"})
    derived: int = 0  # no setting(): not a setting


def test_schema_of_a_settings_dataclass_by_hand():
    assert schema_of(_Example) == {
        "type": "object",
        "additionalProperties": False,
        "description": "An example.",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "description": "required: no default"},
            "kind": {"enum": ["a", "b"], "default": "a", "description": "an enum from a Literal"},
            "size": {"type": ["integer", "null"], "minimum": 1, "default": None, "description": "optional"},
            "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.5,
                     "description": "with limits"},
            "tags": {"type": "array", "items": {"type": "string"}, "default": [], "description": "a factory default"},
        },
    }  # fmt: skip


def test_the_config_schema_is_derived_from_the_stages_dataclasses():
    raw = yaml.safe_load(SCHEMA_PATH.read_text())
    assert not {"train", "backbone", "captioner", "layer_spec", "method"} & set(raw["$defs"])  # stated once, in code
    s = schema()
    run = train_settings.schema()
    assert s["$defs"]["method"] == run["properties"].pop("method")
    assert s["$defs"]["train"] == run
    settable = {f.name for cls in (ModelConfig, TrainConfig) for f in fields(cls)} - {"method"}
    assert set(run["properties"]) == settable and "n_items" not in settable  # derived fields are no settings
    mc, tc = ModelConfig(), TrainConfig()
    for k, v in run["properties"].items():  # every default is the dataclass's own
        assert v["default"] == getattr(mc if hasattr(mc, k) else tc, k), k
    assert run["properties"]["peft"]["properties"]["lora_r"]["default"] == PEFTConfig().lora_r
    backbone = s["$defs"]["backbone"]["properties"]
    assert set(pipeline_only("backbone")) == {"tiny", "shards", "params_b", "n_layers"}
    assert set(backbone) == {f.name for f in dataclasses.fields(BackboneSpec)} | set(pipeline_only("backbone"))
    assert {k: backbone[k]["default"] for k in backbone if k not in pipeline_only("backbone") and k != "model"} == {
        f.name: f.default for f in dataclasses.fields(BackboneSpec) if f.name != "model"
    }
    assert set(s["$defs"]["captioner"]["properties"]) == {f.name for f in dataclasses.fields(CaptionSpec)} | {"tiny"}


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
        (  # Table III's IISAN-VA row as it was: BERT-large keeps 12 + 1 taps against ViT-base's 6 + 1
            lambda c: c["experiments"]["va_bert_large"]["text"].pop("layers"),
            r"experiments\.va_bert_large: the text tower taps 13 layers of bert-large and the image tower 7 of "
            r"vit-base.*`layers: \{n: 6\}`.*allow_unequal_taps: true",
        ),
        (
            lambda c: c["experiments"]["v8_12e_6e"]["train"].pop("allow_unequal_taps"),
            r"experiments\.v8_12e_6e: the text tower taps 13 layers",
        ),
        (
            lambda c: c["targets"]["table4"].update(include=["paper_all"]),
            r"targets\.(table4|paper_all)\.include: the target includes itself",
        ),
        (
            lambda c: c["targets"]["figure5"].update(include=["table4"]),
            r"targets\.figure5: a time-and-memory study \(batch_sizes\) cannot `include`",
        ),
    ],
)
def test_bad_config_is_rejected_before_any_job_with_the_dotted_key(config, edit, match):
    c = copy.deepcopy(config)
    edit(c)
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_a_dataset_train_setting_is_not_overridden_by_defaults(config):
    from iisan.pipeline.runs import merged_settings

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
    def train(name):
        return stage_modules("train", methods.get(name))

    # uncached IISAN selects layers in the loop; the hand-kept list once missed this
    assert "iisan.extract.layerdrop" in train("uncached")
    # cached IISAN never runs a backbone, so editing backbones.py reruns none of its runs
    assert "iisan.extract.backbones" not in train("iisan")
    assert "iisan.train.peft_baselines" in train("lora") and "iisan.train.peft_baselines" not in train("uncached")
    # imports inside functions count (the CLI imports each command's modules lazily)
    assert {"iisan.train.loop", "iisan.extract.extraction", "iisan.results.report"} <= set(closure(["iisan.cli"]))
    # the report needs no torch: it runs in the light environment
    assert "iisan.core.measure" not in stage_modules("report") and "iisan.train.model" not in stage_modules("report")
