"""Finished runs -> results: an experiment's seeds and grid points aggregated
(selected on validation), per-user paired significance tests, efficiency
(TPME), and the report's tables and plots. Needs no torch (the report runs in
a light environment).

May import: ``iisan.core``, ``iisan.train.methods`` (the registry's labels and flags).
"""
