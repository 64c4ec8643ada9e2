"""Foundations every stage uses: named errors, atomic writes and owned folders,
the device resolver and deterministic kernels, settings as dataclasses with the
JSON schema derived from them, time and memory measurements, and the code
hashes that tell Snakemake what a code change reruns.

May import: nothing else of iisan.
"""
