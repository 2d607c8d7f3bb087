"""The project's error base classes and the ``cessl`` exit code of each.

:class:`CesslError` marks the errors a user can act on (a missing input, a registry in
the wrong state, a failed step): the ``cessl`` command line prints their message as one
line and exits with the class's :attr:`~CesslError.exit_code` (2 unless a subclass says
otherwise). Every layer can import this module (it depends on nothing), so the steps
(``components.common.StepError``) and the pipeline (``pipeline.registry.policy.RegistryError``,
``pipeline.dags.finetune.PipelineRunError``) subclass it. Any other exception is a bug and keeps
its traceback (``pipeline.core.failures`` maps the known third-party ones: unreachable servers,
missing credentials, bad files, read-only or full disks).

Exit codes (``cessl --help`` and the README list them too):

== ==========================================================================
0  success
1  a refusal that is an answer (the champion gate refused, ``data add`` conflicts)
2  usage or bad input: a flag's value, a missing file or folder, an unknown model
3  a server does not answer or refuses the credentials (S3, MLflow, KFP, Docker)
4  a bad file or bad data (a truncated model file, an unreadable record, a store)
5  a pipeline step failed (the message names the step and its log)
6  the disk is read-only, full, or not writable by this user
7  insufficient evidence: the champion gate cannot decide (too few frozen test records)
== ==========================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_BAD_FILE = 4
EXIT_STEP_FAILED = 5
EXIT_DISK = 6
EXIT_INSUFFICIENT = 7
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_REFUSED: "refused: the champion gate refused, or `data add` found conflicts",
    EXIT_USAGE: "usage or bad input (a flag's value, a missing file or folder, an unknown model)",
    EXIT_UNAVAILABLE: "a server does not answer or refuses the credentials (S3, MLflow, KFP, Docker)",
    EXIT_BAD_FILE: "a bad file or bad data (a truncated or non-weight model file, unreadable data)",
    EXIT_STEP_FAILED: "a pipeline step failed (the message names the step and its log file)",
    EXIT_DISK: "the disk is read-only, full, or not writable by this user",
    EXIT_INSUFFICIENT: "insufficient evidence: the champion gate cannot decide (too few frozen test records)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class CesslError(Exception):
    """An error whose message tells the user what to fix."""

    exit_code: int = EXIT_USAGE


class ParameterError(CesslError, ValueError):
    """One or more parameters are invalid (the message names each flag and its problem)."""

    exit_code = EXIT_USAGE


class ServiceUnavailableError(CesslError):
    """A server does not answer, or refuses this process's credentials."""

    exit_code = EXIT_UNAVAILABLE


class BadFileError(CesslError):
    """A file exists but cannot be used (truncated, wrong format, wrong content)."""

    exit_code = EXIT_BAD_FILE


class StepFailedError(CesslError):
    """A pipeline step failed."""

    exit_code = EXIT_STEP_FAILED


class DiskError(CesslError):
    """The disk refused a write (read-only, full, permissions)."""

    exit_code = EXIT_DISK
