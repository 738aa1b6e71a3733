"""The tasks of ``gradguard bench``: each is a data source, a loss and an evaluation with the task's
success measure, registered by name.

``make_task(name, **options)`` builds one, ``list_tasks()`` (or ``available_tasks()``) lists them,
``task_info(name)`` gives a task's record (summary, options with their types and defaults):

=================  ========  ===========  =========================================================
task               kind      input        success (see each builder for the source)
=================  ========  ===========  =========================================================
``digits``         classify  (1, 8, 8)    test accuracy >= 0.90
``mnist``          classify  (1, 28, 28)  test accuracy >= 0.95 (IDX files from ``path=``)
``adding``         regress   (T, 2)       no test sequence off by more than 0.4 (Pascanu et al.)
``temporal_order`` classify  (T, 6)       every test sequence right (Pascanu et al.)
``charlm``         lm        (context,)   test bits per character below a bigram count model's
=================  ========  ===========  =========================================================

Every task is deterministic: the same options give bit-identical tensors, and ``batches()`` draws
the same batches from the same ``torch.Generator`` state. Data lives on the CPU; the bench moves
batches to its device, and ``evaluate()`` moves the test split to the model's device.

Example::

    task = make_task("adding", T=100)
    gen = torch.Generator().manual_seed(0)
    for step, (x, y) in zip(range(1000), task.batches(64, gen)):
        loss = task.loss(model(x), y)
        ...
    task.evaluate(model)  # {"loss": ..., "metric": ..., "success": ..., "error_rate": ...}

One task family a module: ``sklearn_digits`` (digits), ``mnist_idx`` (mnist and the IDX reader),
``synthetic`` (adding, temporal_order), ``python_corpus`` (charlm); ``base`` holds the
:class:`Task` record, ``registry`` the registry and ``make_task``, ``checks`` the option checks.
"""

from __future__ import annotations

from ..options import OptionInfo
from .base import KINDS, Criterion, Task
from .registry import (
    TaskInfo,
    _builder,  # noqa: F401 (bench.config reads a builder's type hints)
    available_tasks,
    list_tasks,
    make_task,
    task_info,
    task_infos,
    task_options,
)

# The builders register themselves on import, in this order (the order of ``list_tasks()``).
from .sklearn_digits import DIGITS_STD_FLOOR, digits  # isort: skip
from .mnist_idx import IDX_DTYPES, MNIST_FILES, mnist, read_idx  # isort: skip
from .synthetic import ADDING_CHANCE_MSE, adding, temporal_order  # isort: skip
from .python_corpus import CHARLM_ALPHABET, CHARLM_OTHER, charlm, encode_chars  # isort: skip

__all__ = [
    "ADDING_CHANCE_MSE",
    "CHARLM_ALPHABET",
    "CHARLM_OTHER",
    "DIGITS_STD_FLOOR",
    "IDX_DTYPES",
    "KINDS",
    "MNIST_FILES",
    "Criterion",
    "OptionInfo",
    "Task",
    "TaskInfo",
    "adding",
    "available_tasks",
    "charlm",
    "digits",
    "encode_chars",
    "list_tasks",
    "make_task",
    "mnist",
    "read_idx",
    "task_info",
    "task_infos",
    "task_options",
    "temporal_order",
]
