"""``gradguard bench``: compare mitigations on real tasks where gradients explode.

tasks/     the data sources, losses and success measures, registered by name (one task a module)
models/    the configurable model families, registered by name (one family a module)
options.py what the two registries share: builder options, their type check, the summaries
"""
