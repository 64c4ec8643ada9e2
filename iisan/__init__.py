"""iisan: IISAN / IISAN-Versa decoupled PEFT for multimodal sequential recommendation.

Subpackages, in the order data flows; a subpackage imports only from those
before it (``tests/test_architecture.py`` checks this from the imports):

- ``core``: foundations every stage uses: errors, atomic outputs, devices,
  settings as dataclasses with their schema, measurements, code hashes;
- ``data``: raw files -> a prepared dataset (Amazon, MicroLens, images, the generated demo);
- ``extract``: stage one, frozen models run once over every item: backbones,
  LayerDrop, the Zarr cache, captions from a vision-language model;
- ``train``: stage two: the method registry, item and user encoders, the loop, checkpoints;
- ``results``: runs -> aggregates over seeds, significance tests, tables and plots;
- ``use``: a trained run rebuilt from its folder: top-K recommendations, embeddings;
- ``pipeline``: the Snakemake workflow's logic: config validation, runs, paths and flags;
- ``cli``: the ``iisan`` command line, one module per command group.

``results`` and ``use`` both follow ``train`` and do not import each other.
"""

__version__ = "0.1.0"
