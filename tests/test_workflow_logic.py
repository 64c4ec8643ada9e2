"""The workflow's logic, tested without Snakemake: every path, input and flag the rules use
(iisan.pipeline.workflow), and the cluster profile's resources for every rule."""

import json
import re

import pytest
import yaml

from iisan.core.provenance import code_hash
from iisan.pipeline.config import validate
from iisan.pipeline.workflow import Workflow, names_regex

from conftest import REPO, merged_config


@pytest.fixture(scope="module")
def w():
    return Workflow(
        validate(merged_config(REPO / ".test/demo-small/config.yaml", REPO / ".test/paper-dryrun/config.yaml"))
    )


def test_paths_of_a_generated_and_a_real_dataset(w):
    raw = "results/demo/raw"
    assert w.raw_files("demo") == {"items": f"{raw}/demo_items.tsv", "users": f"{raw}/am_demo_users.tsv",
                                   "images": f"{raw}/images", "frames": None}  # fmt: skip
    assert w.raw_inputs("scientific") == {"items_tsv": ".test/paper-dryrun/data/items.tsv",
                                          "users_tsv": ".test/paper-dryrun/data/users.tsv"}  # fmt: skip
    assert w.images_flag("demo") == "--images results/demo/raw/images" and w.images_flag("scientific") == ""
    assert w.prepare_settings("demo") == {"missing_images": "error", "encoding": "utf-8", "min_seq_len": 5,
                                          "max_seq_len": 10, "format": "amazon", "truncate": True}  # fmt: skip
    assert re.fullmatch(w.synth_names("amazon"), "demo") and not re.fullmatch(w.synth_names("amazon"), "scientific")
    assert re.fullmatch(w.synth_names("microlens"), "microlens_demo")
    assert w.final_output() == ["results/report/demo/summary.json"]


def test_one_cache_path_for_store_completion_file_and_shards(w):
    tower = w.config["experiments"]["va_llama3_70b"]["text"]
    assert w.tower_tag(tower) == "even6"
    assert w.cache_path("scientific", tower, ".done") == "results/scientific/cache/llama3-70b-gptq/even6.done"
    assert w.store("scientific", "llama3-70b-gptq", "even6") == "results/scientific/cache/llama3-70b-gptq/even6.zarr"
    shards = w.shard_outputs("scientific", "llama3-70b-gptq", "even6")
    assert shards == [f"results/scientific/cache/llama3-70b-gptq/even6.shards/{i}-of-4.done" for i in range(4)]
    assert w.store_init("scientific", "llama3-70b-gptq", "even6", 4) == [
        "results/scientific/cache/llama3-70b-gptq/even6.init"
    ]
    assert w.store_init("demo", "tiny-bert", "evenhalf", 1) == []
    assert json.loads(w.layers_json("llama3-70b-gptq", "even6")) == tower["layers"]
    with pytest.raises(ValueError, match="no experiment reads cache 'even9'"):
        w.tower_for("tiny-bert", "even9")


def test_backbone_json_drops_pipeline_keys_and_gives_string_device_ids(w):
    spec = json.loads(w.backbone_json("llama3-70b-gptq"))
    assert not {"tiny", "shards", "params_b", "n_layers"} & set(spec)
    assert spec["max_memory"] == {"0": "20GiB", "cpu": "96GiB"} and spec["batch_size"] == "auto"
    assert (
        w.tiny_stamp("tiny-bert") == ["results/backbones/tiny-bert/iisan-tiny.json"] and w.tiny_stamp("bert-base") == []
    )


def test_caption_fields_name_their_captions(w):
    assert w.tower_tag({"backbone": "tiny-bert", "field": "video_caption", "layers": {}}) == "video_caption-evenhalf"
    assert w.caption_inputs("microlens_demo", "tiny-bert", "video_caption-evenhalf") == {
        "captions": "results/microlens_demo/captions/video"
    }
    assert w.captions_flag("demo", "tiny-bert", "evenhalf") == ""
    assert w.frames_flag("microlens_demo", "video") == "--frames results/microlens_demo/raw/MicroLens-100k_frames.zip"
    assert w.frames_flag("microlens_demo", "cover") == ""
    assert w.captioner_inputs("microlens_demo", "cover") == ["results/backbones/tiny-llava/iisan-tiny.json"]
    assert "tiny" not in json.loads(w.captioner_json("microlens_demo", "cover"))


def test_train_inputs_flags_and_runs(w):
    assert w.train_inputs("demo", "vs_tiny") == {"text": "results/demo/cache/tiny-bert/evenhalf.done",
                                                 "image": "results/demo/cache/tiny-vit/evenhalf.done"}  # fmt: skip
    towers = {"text": "tiny-bert", "image": "tiny-vit"}
    stamps = {f"{t}_backbone": [f"results/backbones/{b}/iisan-tiny.json"] for t, b in towers.items()}
    assert w.train_inputs("demo", "fft_tiny") == stamps
    assert w.item_flags("demo", "vs_tiny") == ("--text-cache results/demo/cache/tiny-bert/evenhalf.zarr "
                                               "--image-cache results/demo/cache/tiny-vit/evenhalf.zarr")  # fmt: skip
    assert "--text-backbone" in w.item_flags("demo", "fft_tiny") and "--text-layers" in w.item_flags("demo", "fft_tiny")
    assert w.run_outputs("demo", "text_only_tiny") == [f"results/demo/text_only_tiny/lr-{lr}_seed-{s}/metrics.json"
                                                      for lr in ("0.001", "0.002") for s in (1, 2)]  # fmt: skip
    assert json.loads(w.train_settings("demo", "text_only_tiny", "lr-0.002_seed-2"))["lr"] == 0.002
    assert re.fullmatch(w.run_names(multi=True), "vs_tiny") and not re.fullmatch(w.run_names(multi=False), "vs_tiny")
    assert w.metric_k("demo", "vs_tiny") == 10
    assert w.train_code("vs_tiny") == code_hash("train", w.method_of("vs_tiny"))
    assert w.train_code("vs_tiny") != w.train_code("fft_tiny")  # different methods run different code


def test_report_inputs_and_target_kinds(w):
    assert w.report_inputs("demo")[0] == "results/demo/vs_tiny/metrics.json"
    assert w.report_inputs("batch_size")[0] == "results/demo/vs_tiny/profile/bs-1.steps-10.json"
    assert re.fullmatch(w.target_names(batch_sizes=True), "batch_size")
    assert not re.fullmatch(w.target_names(batch_sizes=False), "batch_size")
    labels = json.loads(w.report_experiments("demo"))["demo"]
    assert labels["vs_tiny"]["label"] == "IISAN-VS (tiny BERT+ViT)" and labels["vs_tiny"]["text_params_b"] == 0.002
    assert names_regex([]) == "(?!)" and not re.fullmatch(names_regex([]), "")


def _rules() -> set[str]:
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow/rules").glob("*.smk")))
    return set(re.findall(r"(?m)^rule (\w+):", text)) | set(re.findall(r"(?m)^use rule \w+ as (\w+)", text))


def test_every_rule_has_cluster_resources():
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.v8+.yaml").read_text())
    rules = _rules()
    assert {"train", "train_run", "caption", "extract_shard", "report_batch_size"} <= rules  # the parse found them
    missing = sorted(rules - set(profile["set-resources"]))
    assert not missing, missing
    for rule, res in profile["set-resources"].items():
        assert rule in rules, f"the profile sets resources for no rule {rule!r}"
        assert {"runtime", "mem_mb", "cpus_per_task"} <= set(res), rule
    gpu = {r for r, res in profile["set-resources"].items() if res.get("gpu")}
    assert {"extract_shard", "caption", "train", "train_run", "profile"} <= gpu and "report" not in gpu
    assert "localrules:\n    all," in (REPO / "workflow/Snakefile").read_text()
