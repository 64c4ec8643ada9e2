# Stage one. Outputs are small completion files, never the Zarr store itself:
# Snakemake deletes declared outputs before a rerun, and the store must survive
# so a killed or preempted job resumes from its finished chunks.


rule cache_init:
    input:
        unpack(get_caption_inputs),
        data="results/{ds}/data",
        backbone=get_backbone_inputs,
    output:
        touch("results/{ds}/cache/{backbone}/{tag}.init"),
    log:
        "results/logs/{ds}/cache/{backbone}/{tag}.init.log",
    benchmark:
        "results/benchmarks/{ds}/cache/{backbone}/{tag}.init.tsv"
    conda:
        "../../envs/iisan.yaml"
    params:
        spec=get_backbone,
        store=get_store,
        layers=get_layers,
        chunk=config["extract"]["chunk_items"],
        captions=get_captions_flag,
        code=code_hash("extract"),
    shell:
        "iisan --log {log} extract --data {input.data} --backbone {params.spec:q} --layers {params.layers:q} "
        "--store {params.store} "
        "--chunk-items {params.chunk} --on-mismatch rebuild --init-only {params.captions}"


rule extract_shard:
    input:
        unpack(get_caption_inputs),
        data="results/{ds}/data",
        backbone=get_backbone_inputs,
        init=get_store_init,
    output:
        "results/{ds}/cache/{backbone}/{tag}.shards/{shard}-of-{n}.done",
    log:
        "results/logs/{ds}/cache/{backbone}/{tag}.{shard}-of-{n}.log",
    benchmark:
        "results/benchmarks/{ds}/cache/{backbone}/{tag}.{shard}-of-{n}.tsv"
    conda:
        "../../envs/iisan.yaml"
    resources:
        gpu=1,
    params:
        spec=get_backbone,
        store=get_store,
        layers=get_layers,
        chunk=config["extract"]["chunk_items"],
        captions=get_captions_flag,
        # a single job may rebuild a stale store; shards of a split store never delete it
        mismatch=lambda wc: "rebuild" if int(wc.n) == 1 else "error",
        code=code_hash("extract"),
    shell:
        "iisan --log {log} extract --data {input.data} --backbone {params.spec:q} --layers {params.layers:q} "
        "--store {params.store} "
        "--chunk-items {params.chunk} --shard {wildcards.shard} --nshards {wildcards.n} "
        "--on-mismatch {params.mismatch} --done {output} {params.captions}"


rule cache_verify:
    input:
        get_shard_outputs,
    output:
        "results/{ds}/cache/{backbone}/{tag}.done",
    log:
        "results/logs/{ds}/cache/{backbone}/{tag}.verify.log",
    benchmark:
        "results/benchmarks/{ds}/cache/{backbone}/{tag}.verify.tsv"
    conda:
        "../../envs/iisan.yaml"
    params:
        store=get_store,
    shell:
        "iisan --log {log} cache-verify --store {params.store} " "--done {output} {input}"
