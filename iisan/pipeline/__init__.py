"""The Snakemake workflow's logic, unit-testable: validation of config.yaml
(its schema, derived from the stages' settings, and the cross-references a
schema cannot state), the runs an experiment asks for, and every path, input
and flag the rules use (``workflow/rules/common.smk`` only calls these).

May import every stage's light modules (no torch at DAG-build time).
"""
