"""The on-disk checkpoint format, framework-neutral: worker files, the ``easgd`` section, atomic writes, RNG states.

Both adapters write and read the same layout through this package. It may import ``torch``, ``lightning.fabric``,
``lightning_easgd.core`` and ``lightning_easgd.adapter``; never ``lightning.pytorch`` or the adapters above it.
"""
