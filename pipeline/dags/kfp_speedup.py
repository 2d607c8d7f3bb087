"""A cheaper caller lookup in ``kfp``'s task setters (same check, same message).

``kfp.dsl.PipelineTask._ensure_container_spec_exists`` (kfp 2.x) runs before every
``set_cpu_limit`` / ``set_memory_request`` / ``set_accelerator_type`` / ... call and takes the
caller's name from ``inspect.stack()``, which builds the source context of *every* frame on
the stack (``inspect.getmodule`` scans ``sys.modules`` per frame). One finetune DAG makes ~40
such calls: ~9 s of a 10 s ``cessl compile`` under a test runner, most of the time of every
compile test. :func:`install` replaces it with the same check reading only the caller's frame
(``sys._getframe(1)``). Installed once by :mod:`pipeline.dags.tasks`; checked by
``tests/unit/test_pipeline_compile.py``.
"""

from __future__ import annotations

import sys

from kfp.dsl.pipeline_task import PipelineTask

MESSAGE = (
    "{caller} can only be used on single-step components, not pipelines used as components, "
    "or special components like importers."
)


def _ensure_container_spec_exists(self: PipelineTask) -> None:
    """kfp's check, with the caller's name from its own frame instead of ``inspect.stack()``."""
    if self.container_spec is None:
        raise ValueError(MESSAGE.format(caller=sys._getframe(1).f_code.co_name))


def install() -> None:
    PipelineTask._ensure_container_spec_exists = _ensure_container_spec_exists
