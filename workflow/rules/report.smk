rule report:
    input:
        get_report_inputs,
    output:
        "results/report/{target}/summary.json",
    params:
        experiments=report_experiments,
        code=code_hash("report"),
    conda:
        "../../envs/iisan.yaml"
    log:
        "results/logs/report/{target}.log",
    benchmark:
        "results/benchmarks/report/{target}.tsv"
    shell:
        "iisan --log {log} report --results results --experiments {params.experiments:q} --out results/report/{wildcards.target}"
