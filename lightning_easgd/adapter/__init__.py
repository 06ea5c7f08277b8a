"""What the Trainer and Fabric adapters share: the worker layout, the adapter's own options and the module's state
(the exchange's options are the core's ``ExchangeConfig``).

This layer sits between the framework-free ``core`` and the two framework adapters. It may import ``torch``,
``lightning.fabric`` and ``lightning_easgd.core``; never ``lightning.pytorch`` (the Fabric strategy must not pull
in the Trainer package) and never the layers above it (``checkpoint``, ``trainer``, ``fabric``).
"""
