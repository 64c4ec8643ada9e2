"""Stage two: the method registry, the settings of a run, what item encoders
read (caches, or backbones in the loop), the SAN towers, the baselines and
anchors, the sequence encoder, the loss, ranking metrics, the training loop,
checkpoints, and time-and-memory profiling.

May import: ``iisan.core``, ``iisan.data``, ``iisan.extract``.
"""
