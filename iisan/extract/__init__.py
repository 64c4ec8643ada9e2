"""Stage one: frozen models run once over every item. Backbones (loading,
pooling, quantised and offloaded LLMs), LayerDrop's layer selection, batching
by length, the chunked Zarr cache (write, resume, verify, read), extraction
itself, captions from a frozen vision-language model, and tiny local models.

May import: ``iisan.core``, ``iisan.data``.
"""
