"""The project's error base class.

:class:`CesslError` marks the errors a user can act on (a missing input, a registry in
the wrong state, a failed step): the ``cessl`` command line prints their message and
exits 2. Every layer can import it (it depends on nothing), so the steps
(``components.common.StepError``) and the pipeline (``pipeline.registry.RegistryError``,
``pipeline.dag.PipelineRunError``) subclass it. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations


class CesslError(Exception):
    """An error whose message tells the user what to fix."""
