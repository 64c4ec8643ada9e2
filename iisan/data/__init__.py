"""Raw files -> a prepared dataset: the authors' Amazon TSVs, MicroLens-100K as
published, item images (folder, zip, LMDB), the generated demo, and the
prepared-dataset folder every later stage reads (items, sequences,
leave-one-out splits, popularity, fingerprints).

May import: ``iisan.core``.
"""
