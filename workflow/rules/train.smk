# Stage two. An experiment with one seed and no grid is one run in results/{ds}/{exp}/;
# with seeds and/or a grid, each run has its own folder and `aggregate` writes the
# experiment's metrics.json (mean, sd, per seed; the grid point selected on validation).


rule train:
    input:
        unpack(get_train_inputs),
        data="results/{ds}/data",
    output:
        metrics="results/{ds}/{exp}/metrics.json",
        efficiency="results/{ds}/{exp}/efficiency.json",
    log:
        "results/logs/{ds}/{exp}/train.log",
    benchmark:
        "results/benchmarks/{ds}/{exp}/train.tsv"
    wildcard_constraints:
        exp=W.run_names(multi=False),
    conda:
        "../../envs/iisan.yaml"
    resources:
        gpu=1,
    params:
        settings=get_train_settings,
        item_flags=get_item_flags,
        out=lambda wc, output: os.path.dirname(output.metrics),
        tags=get_run_tags,
        code=get_train_code,
    shell:
        "iisan --log {log} train --data {input.data} {params.item_flags} --settings {params.settings:q} "
        "--name {wildcards.exp} --tags {params.tags:q} --out {params.out}"


use rule train as train_run with:
    output:
        metrics="results/{ds}/{exp}/{run}/metrics.json",
        efficiency="results/{ds}/{exp}/{run}/efficiency.json",
    log:
        "results/logs/{ds}/{exp}/{run}/train.log",
    benchmark:
        "results/benchmarks/{ds}/{exp}/{run}/train.tsv"
    wildcard_constraints:
        exp=W.run_names(multi=True),
        run="[^/]+",


rule aggregate:
    input:
        get_run_outputs,
    output:
        metrics="results/{ds}/{exp}/metrics.json",
        efficiency="results/{ds}/{exp}/efficiency.json",
    log:
        "results/logs/{ds}/{exp}/aggregate.log",
    benchmark:
        "results/benchmarks/{ds}/{exp}/aggregate.tsv"
    wildcard_constraints:
        exp=W.run_names(multi=True),
    conda:
        "../../envs/report.yaml"
    params:
        runs=get_aggregate_runs,
        out=lambda wc, output: os.path.dirname(output.metrics),
        code=code_hash("aggregate"),
    shell:
        "iisan --log {log} aggregate --runs {params.runs:q} --out {params.out}"


rule profile:
    input:
        unpack(get_train_inputs),
        data="results/{ds}/data",
    output:
        "results/{ds}/{exp}/profile/bs-{bs}.steps-{steps}.json",
    log:
        "results/logs/{ds}/{exp}/profile/bs-{bs}.steps-{steps}.log",
    benchmark:
        "results/benchmarks/{ds}/{exp}/profile/bs-{bs}.steps-{steps}.tsv"
    wildcard_constraints:
        bs=r"\d+",
        steps=r"\d+",
    conda:
        "../../envs/iisan.yaml"
    resources:
        gpu=1,
    params:
        settings=get_train_settings,
        item_flags=get_item_flags,
        code=get_profile_code,
    shell:
        "iisan --log {log} profile --data {input.data} {params.item_flags} --settings {params.settings:q} "
        "--batch-size {wildcards.bs} --steps {wildcards.steps} --out {output}"


rule recommend:
    input:
        "results/{ds}/{exp}/metrics.json",
    output:
        "results/{ds}/{exp}/recommendations.{fmt}",
    log:
        "results/logs/{ds}/{exp}/recommend.{fmt}.log",
    benchmark:
        "results/benchmarks/{ds}/{exp}/recommend.{fmt}.tsv"
    wildcard_constraints:
        fmt="tsv|parquet",
    conda:
        "../../envs/iisan.yaml"
    params:
        k=get_metric_k,
        code=code_hash("recommend"),
    shell:
        "iisan --log {log} recommend --run $(dirname {input}) --k {params.k} --out {output}"
