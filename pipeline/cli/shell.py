"""Commands printed for a person to copy: spelled so that they run from where they were printed.

``make demo`` starts ``.venv/bin/cessl``; a summary that says ``cessl promote ...`` fails
(``cessl: command not found``) when the virtual environment is not activated. A printed
command names ``cessl`` (or ``mlflow``) only when that name on ``PATH`` is the program
this process runs with; otherwise the path it was started as (``.venv/bin/cessl``), or
``python -m``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

CESSL = "cessl"
CESSL_MODULE = "pipeline.cli"


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, quoted for a shell."""
    absolute = path.absolute()
    try:
        text = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        text = str(absolute)
    return shlex.quote(text if "/" in text else f"./{text}")


def program(name: str, module: str, argv0: str | None = None) -> str:
    """How to start the console script ``name`` of this Python environment, as typed in a shell:
    ``name`` when ``PATH`` finds this one, else its path, else ``python -m module``.
    ``argv0``: the path this process was started as (``sys.argv[0]``), when it is ``name``."""
    on_path = shutil.which(name)
    candidates = [Path(argv0)] if argv0 and Path(argv0).name == name else []
    candidates.append(Path(sys.executable).parent / name)
    for script in candidates:
        if script.is_file():
            return name if on_path and _same_file(on_path, script) else _shown(script)
    return f"{_shown(Path(sys.executable))} -m {module}"


def cessl_command() -> str:
    """The ``cessl`` of this process, runnable as printed (see the module's notes)."""
    return program(CESSL, CESSL_MODULE, sys.argv[0] if sys.argv else None)


def mlflow_command() -> str:
    """The ``mlflow`` of this Python environment, runnable as printed."""
    return program("mlflow", "mlflow")


def runnable(line: str) -> str:
    """``line`` with a leading ``cessl`` / ``mlflow`` spelled so that it runs from here."""
    head, _, rest = line.partition(" ")
    spelled = {CESSL: cessl_command, "mlflow": mlflow_command}.get(head)
    return f"{spelled()} {rest}".rstrip() if spelled else line


def shell_uri(uri: str) -> str:
    """``uri`` as one word of a printed command: a password in it masked (summaries are
    printed, not logged, so the log redaction does not see them), then shell-quoted."""
    from pipeline.core.logsafe import redact

    return shlex.quote(redact(uri))


def shell_command(argv: list[str]) -> str:
    """``argv`` as one line to print, log or tag: shell-quoted, a password in a URI masked."""
    from pipeline.core.logsafe import redact

    return redact(shlex.join(argv))
