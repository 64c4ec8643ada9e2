rule train:
    input:
        unpack(get_train_inputs),
        data="results/{ds}/data",
    output:
        metrics="results/{ds}/{exp}/metrics.json",
        efficiency="results/{ds}/{exp}/efficiency.json",
    params:
        settings=train_settings,
        item_flags=item_flags,
        code=train_code,
    resources:
        gpu=1,
    conda:
        "../../envs/iisan.yaml"
    log:
        "results/logs/{ds}/{exp}/train.log",
    benchmark:
        "results/benchmarks/{ds}/{exp}/train.tsv"
    shell:
        "iisan --log {log} train --data {input.data} {params.item_flags} --settings {params.settings:q} "
        "--name {wildcards.exp} --out results/{wildcards.ds}/{wildcards.exp}"
