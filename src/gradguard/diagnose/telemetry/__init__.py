"""Telemetry: what a Guard with ``log_dir`` records, from the statistics it already computed.

Per step: the global norm before and after mitigation, per-layer gradient norms (from the
per-parameter norms of the one fused pass: no second pass over the gradients), what each policy did,
the loss, the LR, the input batch's mean/std/absmax, the output logits' absmax and logz, the AMP
scale; on sampled steps the per-layer update/weight ratio and dead units, the attention modules'
max logits and the spectral radius of recurrent weights. Events (``events.py``) are
detected on every step; the file keeps a bounded record:

* every step for the first 1000, then every 10th to 10 000, every 100th to 100 000, ... (``every``
  = ``"auto"``; an int keeps every n-th step), so a long run's file grows with log(steps);
* the ``context`` steps before each event and after it, exactly, whatever the sampling.

Nothing here blocks training: the step's numbers are gathered into one small device vector and
copied to the host without waiting (``non_blocking``, with a CUDA event); the copy is read a step
later, when it has long landed. Records are buffered and written in whole lines, flushed on every
event and on ``close()``. TensorBoard event files (``RUN_DIR/tb``) get the same kept steps.

One stage a module: ``collect`` (during the step, on the device), ``host`` (the vector read back
into a step record), ``sampling`` (which steps are kept), ``tensorboard`` (the TensorBoard writer;
the JSONL one is ``records.RecordWriter``); ``recorder`` holds :class:`Telemetry`, which runs them.
"""

from __future__ import annotations

from .collect import _has_normalization, _Pending, spectral_radius  # noqa: F401 (private: as before)
from .recorder import Telemetry
from .sampling import _keep_auto  # noqa: F401 (private, as before the split: the tests use it)
from .tensorboard import _tensorboard_without_tensorflow  # noqa: F401 (private, as before)

__all__ = ["Telemetry", "spectral_radius"]
