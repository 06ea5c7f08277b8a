"""The on-disk checkpoint format, framework-neutral, and the steps that write and read it.

``worker_files`` (each worker's own file, shared by checkpoints of the same step), ``section`` (the checkpoint's
``"easgd"`` section and the center beside it), ``routines`` (the one save routine and the one resume routine both
adapters call), ``atomic_io`` (atomic local writes) and ``rng`` (random number generator states).

It may import ``torch``, ``lightning.fabric``, ``lightning_easgd.core`` and ``lightning_easgd.adapter``; never
``lightning.pytorch`` or the adapters above it (tests/trainer/test_checkpoint_files.py checks every import).
"""
