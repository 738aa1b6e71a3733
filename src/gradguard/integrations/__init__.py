"""Adapters for the frameworks people train with. Each is thin: the policies, the statistics and the
telemetry are the core Guard's; an adapter only finds the framework's moment to measure (after
backward and AMP unscaling, before any clipping of the framework's own) and its way to skip.

- :mod:`gradguard.integrations.lightning`: ``GuardCallback`` for ``lightning.Trainer``.
- :mod:`gradguard.integrations.hf`: ``GuardedTrainer`` and ``GuardCallback`` for
  ``transformers.Trainer``.
- :mod:`gradguard.keras`: the policies in ``keras.ops`` for Keras 3 (TensorFlow, JAX, torch).

Importing this package imports no framework; each module imports its own and says which extra to
install when it is missing.
"""
