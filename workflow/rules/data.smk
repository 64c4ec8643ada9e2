rule synth:
    output:
        titles="results/{ds}/raw/{ds}_items.tsv",
        sequences="results/{ds}/raw/am_{ds}_users.tsv",
        images=directory("results/{ds}/raw/images"),
    log:
        "results/logs/{ds}/synth.log",
    benchmark:
        "results/benchmarks/{ds}/synth.tsv"
    wildcard_constraints:
        ds=W.synth_names("amazon"),
    conda:
        "../../envs/iisan.yaml"
    params:
        synth=get_synth_settings,
        code=code_hash("prepare"),
    shell:
        "iisan --log {log} synth --name {wildcards.ds} --out results/{wildcards.ds}/raw --items {params.synth[items]} "
        "--users {params.synth[users]} --seed {params.synth[seed]} --image-size {params.synth[image_size]}"


rule synth_microlens:
    output:
        titles="results/{ds}/raw/MicroLens-100k_title_en.csv",
        pairs="results/{ds}/raw/MicroLens-100k_pairs.tsv",
        pairs_csv="results/{ds}/raw/MicroLens-100k_pairs.csv",
        covers="results/{ds}/raw/MicroLens-100k_covers.zip",
        frames="results/{ds}/raw/MicroLens-100k_frames.zip",
    log:
        "results/logs/{ds}/synth.log",
    benchmark:
        "results/benchmarks/{ds}/synth.tsv"
    wildcard_constraints:
        ds=W.synth_names("microlens"),
    conda:
        "../../envs/iisan.yaml"
    params:
        synth=get_synth_settings,
        code=code_hash("prepare"),
    shell:
        "iisan --log {log} synth --format microlens --out results/{wildcards.ds}/raw --items {params.synth[items]} "
        "--users {params.synth[users]} --seed {params.synth[seed]} --image-size {params.synth[image_size]}"


rule prepare:
    input:
        unpack(get_raw_inputs),
    output:
        directory("results/{ds}/data"),
    log:
        "results/logs/{ds}/prepare.log",
    benchmark:
        "results/benchmarks/{ds}/prepare.tsv"
    conda:
        "../../envs/iisan.yaml"
    params:
        images=get_images_flag,
        listing=get_images_listing,
        ds=get_prepare_settings,
        truncate=lambda wc: "" if get_prepare_settings(wc)["truncate"] else "--no-truncate",
        code=code_hash("prepare"),
    shell:
        "iisan --log {log} prepare --items {input.items_tsv:q} --users {input.users_tsv:q} {params.images} "
        "--missing-images {params.ds[missing_images]} --encoding {params.ds[encoding]} "
        "--min-seq-len {params.ds[min_seq_len]} --max-seq-len {params.ds[max_seq_len]} --format {params.ds[format]} "
        "{params.truncate} --out {output}"


rule build_tiny:
    input:
        get_tiny_inputs,
    output:
        "results/backbones/{backbone}/iisan-tiny.json",
    log:
        "results/logs/backbones/{backbone}.log",
    benchmark:
        "results/benchmarks/backbones/{backbone}.tsv"
    conda:
        "../../envs/iisan.yaml"
    params:
        code=code_hash("backbones"),
    shell:
        "iisan --log {log} build-tiny {wildcards.backbone} --out results/backbones/{wildcards.backbone}"
