# iisan: prepare -> extract (frozen backbones, selected layers) -> train (SANs) -> report.
# All logic lives in the `iisan` package; rules only call its command line.
from snakemake.utils import min_version

from iisan.pipeline.config import validate

min_version("9.0")


configfile: "config.yaml"


# jobs find `iisan` on PATH: workflow/rules/common.smk puts this environment's bin first
envvars:
    "PATH",


# the package's schema (iisan/config.schema.yaml), with defaults and cross-references
validate(config)


wildcard_constraints:
    ds="[^/]+",
    exp="[^/]+",
    backbone="[^/]+",
    tag="[^/.]+",
    target="[^/]+",
    shard=r"\d+",
    n=r"\d+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/caption.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


rule all:
    input:
        get_final_output(),
