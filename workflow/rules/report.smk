# Tables and plots per target. Each output is flagged for `snakemake --report report.html`,
# with a caption in workflow/report/ saying what it shows and how it was made.


rule report:
    input:
        get_report_inputs,
        paper=PAPER_TABLES,
    output:
        summary="results/report/{target}/summary.json",
        reproduction=report_output("reproduction.csv", "reproduction.rst", "tables"),
        reproduction_md="results/report/{target}/reproduction.md",
        main=report_output("main.csv", "main.rst", "tables"),
        scaling=report_output("scaling.csv", "scaling.rst", "tables"),
        ablation=report_output("ablation.csv", "ablation.rst", "tables"),
        layers=report_output("layers.csv", "layers.rst", "tables"),
        multimodal_text=report_output("multimodal_text.csv", "multimodal_text.rst", "tables"),
        efficiency=report_output("efficiency.csv", "efficiency.rst", "tables"),
        storage=report_output("storage.csv", "storage.rst", "tables"),
        grid=report_output("grid.csv", "grid.rst", "tables"),
        markdown=multiext(
            "results/report/{target}/",
            "main.md",
            "scaling.md",
            "ablation.md",
            "layers.md",
            "multimodal_text.md",
            "efficiency.md",
            "storage.md",
        ),
        hr=report_output("hr_by_text_encoder.png", "hr_by_text_encoder.rst", "plots"),
        time_memory=report_output("time_memory_by_method.png", "time_memory_by_method.rst", "plots"),
        cache=report_output("cache_storage.png", "cache_storage.rst", "plots"),
        curves=report_output("training_curves.png", "training_curves.rst", "plots"),
        gates=report_output("gates.png", "gates.rst", "plots"),
        layerdrop_cost=report_output("layerdrop_cost.png", "layerdrop_cost.rst", "plots"),
    log:
        "results/logs/report/{target}.log",
    benchmark:
        "results/benchmarks/report/{target}.tsv"
    wildcard_constraints:
        target=W.target_names(batch_sizes=False),
    conda:
        "../../envs/report.yaml"
    params:
        experiments=get_report_experiments,
        metrics=W.report_metrics(),
        code=code_hash("report"),
    shell:
        "iisan --log {log} report --results results --experiments {params.experiments:q} "
        "--metrics {params.metrics:q} --out results/report/{wildcards.target}"


rule report_batch_size:
    input:
        get_report_inputs,
    output:
        summary="results/report/{target}/summary.json",
        table=report_output("time_memory_by_batch_size.csv", "time_memory_by_batch_size.rst", "tables"),
        plot=report_output("time_memory_by_batch_size.png", "time_memory_by_batch_size.rst", "plots"),
    log:
        "results/logs/report/{target}.log",
    benchmark:
        "results/benchmarks/report/{target}.tsv"
    wildcard_constraints:
        target=W.target_names(batch_sizes=True),
    conda:
        "../../envs/report.yaml"
    params:
        profiles=lambda wc, input: json.dumps(list(input)),
        experiments=get_report_experiments,
        code=code_hash("report"),
    shell:
        "iisan --log {log} report --results results --profiles {params.profiles:q} "
        "--experiments {params.experiments:q} --out results/report/{wildcards.target}"
