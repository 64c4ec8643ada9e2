rule report:
    input:
        [f"results/{ds}/{e}/metrics.json" for ds, e in target_runs()],
    output:
        "results/report/summary.json",
    params:
        experiments=report_experiments(),
        code=code_hash("report"),
    conda:
        "../../envs/iisan.yaml"
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    shell:
        "iisan --log {log} report --results results --experiments {params.experiments:q} --out results/report"
