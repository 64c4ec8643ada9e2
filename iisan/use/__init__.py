"""Using a trained run: the recommender rebuilt from its folder alone, top-K
recommendations and embeddings.

May import: ``iisan.core``, ``iisan.data``, ``iisan.extract``, ``iisan.train``.
"""
