"""``gradguard bench``: compare mitigations on real tasks where gradients explode.

tasks.py   the data sources, losses and success measures, registered by name
models.py  the configurable model families, registered by name
"""
