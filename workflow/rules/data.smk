rule synth:
    output:
        titles="results/{ds}/raw/{ds}_items.tsv",
        sequences="results/{ds}/raw/am_{ds}_users.tsv",
        images=directory("results/{ds}/raw/images"),
    params:
        synth=lambda wc: _need("datasets", wc.ds)["synth"],
        code=code_hash("prepare"),
    conda:
        "../../envs/iisan.yaml"
    log:
        "results/logs/{ds}/synth.log",
    benchmark:
        "results/benchmarks/{ds}/synth.tsv"
    shell:
        "iisan --log {log} synth --out results/{wildcards.ds}/raw --items {params.synth[items]} "
        "--users {params.synth[users]} --seed {params.synth[seed]}"


rule prepare:
    input:
        get_raw_inputs,
    output:
        directory("results/{ds}/data"),
    params:
        files=lambda wc: raw_files(wc.ds),
        missing=lambda wc: _need("datasets", wc.ds).get("missing_images", "error"),
        code=code_hash("prepare"),
    conda:
        "../../envs/iisan.yaml"
    log:
        "results/logs/{ds}/prepare.log",
    benchmark:
        "results/benchmarks/{ds}/prepare.tsv"
    shell:
        "iisan --log {log} prepare --items {params.files[items]} --users {params.files[users]} "
        "$( [ '{params.files[images]}' != 'None' ] && echo --images {params.files[images]} ) "
        "--missing-images {params.missing} --out {output}"


rule build_tiny:
    input:
        # the GPTQ model is quantised from the tiny Llama built by its own job
        lambda wc: ["results/backbones/tiny-llama/iisan-tiny.json"] if wc.backbone == "tiny-llama-gptq" else [],
    output:
        "results/backbones/{backbone}/iisan-tiny.json",
    params:
        code=code_hash("backbones"),
    conda:
        "../../envs/iisan.yaml"
    log:
        "results/logs/backbones/{backbone}.log",
    benchmark:
        "results/benchmarks/backbones/{backbone}.tsv"
    shell:
        "iisan --log {log} build-tiny {wildcards.backbone} --out results/backbones/{wildcards.backbone}"
