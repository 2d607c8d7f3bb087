"""The command line's declared-once options: ``--params FILE``, ``--profile``, ``--version``
and a parser that builds without the heavy libraries.

Every case parses a real command line with the real parser (``pipeline.cli.build_parser``);
nothing runs a verb's body.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml.errors import EXIT_USAGE, ParameterError
from pipeline import cli
from pipeline.cli.options import parse_args
from pipeline.core.constraints import value_problem
from pipeline.core.files import MAX_FILE_BYTES
from pipeline.core.params import (
    DEFAULTS,
    DEMO_PARAMS,
    PROFILE_FIELDS,
    cli_fields,
    field_types,
    flag_of,
    params_from_args,
)
from pipeline.core.pretrain_params import LOCAL_DEFAULTS as PRETRAIN_LOCAL_DEFAULTS
from pipeline.core.pretrain_params import params_from_args as pretrain_params_from_args

REPO = Path(__file__).resolve().parents[2]
HOST = "http://127.0.0.1:9"
HEAVY = ("torch", "mlflow", "kfp", "pandas", "kserve", "dvc", "boto3", "matplotlib", "scipy", "sklearn", "wfdb")
# Each verb that takes --params, with the rest of a valid command line.
PARAMS_VERBS: dict[str, list[str]] = {
    "run": ["run"],
    "compile": ["compile"],
    "submit": ["submit", "--host", HOST],
    "schedule": ["schedule", "--host", HOST, "--cron", "0 3 * * 1"],
    "retrain": ["retrain"],
    "compare": ["compare"],
    "backbone pipeline compile": ["backbone", "pipeline", "compile"],
    "backbone pipeline submit": ["backbone", "pipeline", "submit", "--host", HOST],
    "backbone pipeline run": ["backbone", "pipeline", "run"],
}


def parse(argv: list[str]) -> argparse.Namespace:
    return parse_args(cli.build_parser(), argv)


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one stderr line of a command line the parser refuses (exit 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture()
def params_file(tmp_path: Path):
    def write(text: str, name: str = "params.yaml") -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


# --------------------------------------------------------------------------- --params FILE


def test_a_file_sets_the_flags_by_either_spelling(params_file):
    path = params_file("max-steps: 40\nlabelled_ratio: 0.5\nexperiment: trial\nr: 8\nno-push: true\n")
    args = parse(["run", "--params", path])
    params = params_from_args(args, DEMO_PARAMS)
    assert (params.max_steps, params.labelled_ratio, params.experiment_name, params.r) == (40, 0.5, "trial", 8)
    assert args.no_push is True
    assert params.seed == DEMO_PARAMS.seed  # what the file leaves out keeps the defaults


def test_the_command_line_overrides_the_file(params_file):
    path = params_file("max_steps: 40\nseed: 3\n")
    params = params_from_args(parse(["run", "--params", path, "--max-steps", "7"]), DEMO_PARAMS)
    assert (params.max_steps, params.seed) == (7, 3)


def test_every_run_submit_schedule_retrain_compare_verb_reads_a_file(params_file):
    path = params_file("tracking-uri: sqlite:///from-file.db\n")
    for verb, argv in PARAMS_VERBS.items():
        if verb.endswith("compile"):
            continue  # no tracking store: the cluster settings instead
        assert parse([*argv, "--params", path]).tracking_uri == "sqlite:///from-file.db", verb
    compile_file = params_file("config-map: from-file\n", "compile.yaml")
    for verb in ("compile", "backbone pipeline compile"):
        assert parse([*PARAMS_VERBS[verb], "--params", compile_file]).config_map == "from-file", verb


@pytest.mark.parametrize(
    ("text", "line", "named"),
    [
        ("seed: 1\nmax_stepz: 40\n", 2, "max_stepz: unknown key, not a flag of cessl run (did you mean max-steps?)"),
        ("labelled-ratio: 1.5\n", 1, "labelled-ratio: 1.5: must be a finite number > 0 and < 1"),
        ("\n\nmax_steps: many\n", 3, "max_steps: 'many' is not an integer"),
        ("epochs: 1.5\n", 1, "epochs: '1.5' is not an integer"),
        ("method: magic\n", 1, "method: 'magic' is not one of"),
        ("frozen_testset: no\n", 1, "frozen_testset: expected a value for --frozen-testset, got False"),
        ("seed: [1, 2]\n", 1, "seed: expected a value for --seed, got [1, 2]"),
        ("seed:\n", 1, "seed: expected a value for --seed, got no value"),
        ("seed: {a: 1}\n", 1, "seed: expected a value or a list of values"),
        ("no-push: maybe\n", 1, "no-push: expected true or false, got 'maybe'"),
        ("tracking-uri: ftp://x\n", 1, "tracking-uri: ftp://x: unsupported scheme 'ftp'"),
        ("max-steps: 4\nmax_steps: 5\n", 2, "--max-steps set twice (first on line 1)"),
        ("params: other.yaml\n", 1, "params: unknown key"),
        ("- seed\n", 1, "expected a mapping of flag: value"),
        ("seed: [\n", 2, "not valid YAML"),
        ("seed: 2020-13-45\n", 1, "seed: not a valid YAML value"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_line_and_key(text, line, named, params_file, capsys):
    path = params_file(text)
    message = refused(["run", "--params", path], capsys)
    assert message.startswith(f"cessl run: error: --params {path}:{line}: "), message
    assert named in message, message


def test_the_file_is_checked_by_the_same_constraints_as_the_flags(params_file, capsys):
    """Each pipeline parameter's out-of-range value is refused from a file with the problem
    its PipelineParams constraints give (the flags' validation path)."""
    types = field_types()
    for field in cli_fields():
        meta, kind = field.metadata, types[field.name]
        bad = [
            meta[k] + d
            for k, d in (("minimum", -1), ("exclusive_minimum", 0), ("maximum", 1))
            if meta.get(k) is not None
        ]
        bad += [meta["exclusive_maximum"]] if meta.get("exclusive_maximum") is not None else []
        for value in (kind(v) for v in bad):
            message = refused(["run", "--params", params_file(f"{field.name}: {value!r}\n")], capsys)
            assert message.endswith(
                f":1: {field.name}: {value!r}: {value_problem(field, value)} (see cessl run --help)"
            )
            with pytest.raises(ParameterError, match=re.escape(flag_of(field.name))):
                DEFAULTS.replace(**{field.name: value})  # the same value, refused by PipelineParams itself


def test_a_pretraining_verb_checks_the_pretraining_constraints(params_file, capsys):
    """``lr: 0`` is the scaling rule for pre-training, and no learning rate for fine-tuning."""
    path = params_file("lr: 0\nnodes: 1\n")
    args = parse(["backbone", "pipeline", "run", "--params", path])
    assert pretrain_params_from_args(args, PRETRAIN_LOCAL_DEFAULTS).lr == 0.0
    assert "lr: 0.0: must be a finite number > 0" in refused(["run", "--params", path], capsys)


def test_a_file_that_is_not_a_small_regular_file_is_refused(tmp_path, params_file, capsys):
    big = params_file("# padding\n" * (MAX_FILE_BYTES // 10 + 1), "big.yaml")
    assert "larger than 1 MiB" in refused(["run", "--params", big], capsys)
    assert "not a regular file" in refused(["run", "--params", str(tmp_path)], capsys)
    assert "missing.yaml: no such file" in refused(["run", "--params", str(tmp_path / "missing.yaml")], capsys)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"seed: \xff\n")
    assert "not UTF-8 text" in refused(["run", "--params", str(binary)], capsys)
    if hasattr(os, "mkfifo"):  # a FIFO never blocks the reader
        fifo = tmp_path / "fifo.yaml"
        os.mkfifo(fifo)
        start = time.perf_counter()
        assert "not a regular file" in refused(["run", "--params", str(fifo)], capsys)
        assert time.perf_counter() - start < 5


def test_an_empty_file_changes_nothing(params_file):
    assert params_from_args(parse(["run", "--params", params_file("")]), DEMO_PARAMS) == DEMO_PARAMS


# --------------------------------------------------------------------------- --profile


def test_profiles_pick_the_defaults_that_differ_between_local_and_cluster(params_file):
    assert set(PROFILE_FIELDS) >= {"epochs", "max_steps", "backbone_config"}
    cluster_run = params_from_args(parse(["run", "--profile", "cluster"]), DEMO_PARAMS)
    assert all(getattr(cluster_run, f) == getattr(DEFAULTS, f) for f in PROFILE_FIELDS)
    local_submit = params_from_args(parse(["submit", "--host", HOST, "--profile", "local"]), DEFAULTS)
    assert all(getattr(local_submit, f) == getattr(DEMO_PARAMS, f) for f in PROFILE_FIELDS)
    assert params_from_args(parse(["run", "--profile", "cluster", "--epochs", "3"]), DEMO_PARAMS).epochs == 3
    from_file = parse(["run", "--params", params_file("profile: cluster\nseed: 2\n")])
    assert params_from_args(from_file, DEMO_PARAMS) == DEFAULTS.replace(seed=2)


def test_without_a_profile_the_verbs_keep_their_defaults():
    assert params_from_args(parse(["run"]), DEMO_PARAMS) == DEMO_PARAMS
    assert params_from_args(parse(["submit", "--host", HOST]), DEFAULTS) == DEFAULTS


def test_help_shows_each_verbs_defaults(capsys):
    for argv, shown in (
        (["run", "--help"], f"(default: {DEMO_PARAMS.max_steps})"),
        (["submit", "--help"], f"(default: {DEFAULTS.max_steps})"),
        (["retrain", "--help"], f"(default: {DEMO_PARAMS.max_steps} (local), {DEFAULTS.max_steps} (cluster))"),
    ):
        with pytest.raises(SystemExit):
            parse(argv)
        assert shown in " ".join(capsys.readouterr().out.split()), argv


# --------------------------------------------------------------------------- --version


def test_version_names_the_package_version_and_commit(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("cessl 0.") and "(git " in out, out  # this checkout is a git work tree


# --------------------------------------------------------------------------- a fast parser

RENDER_EVERY_HELP = """
import argparse, json, sys
from pipeline.cli import build_parser

def walk(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)

helps = [p.format_help() for p in walk(build_parser())]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:])
print(json.dumps({"verbs": len(helps), "heavy": heavy}))
"""


def test_building_the_parser_imports_no_heavy_library():
    """The parser, and every verb's help, in a fresh interpreter: none of the heavy libraries loaded."""
    import json

    proc = subprocess.run(
        [sys.executable, "-c", RENDER_EVERY_HELP, *HEAVY],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["verbs"] > 30
    assert found["heavy"] == [], f"building the parser imported {found['heavy']}"


def test_cessl_help_is_fast():
    """`cessl --help` under 1 s: its own CPU time (user + system, what it costs on an idle
    machine: about 0.3 s) always; the wall-clock time too unless the machine is oversubscribed
    (more runnable processes than cores stretch any wall-clock bound)."""
    cpu, wall = [], []
    for _ in range(3):
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "--help"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            timeout=60,
            check=True,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall.append(time.perf_counter() - start)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    assert statistics.median(cpu) < 1.0, f"CPU seconds {cpu}"
    if os.getloadavg()[0] <= (os.cpu_count() or 1):
        assert statistics.median(wall) < 1.5, f"wall-clock seconds {wall}"


def test_a_required_flag_may_come_from_the_file(params_file, capsys):
    args = parse(["schedule", "--params", params_file(f"host: {HOST}\ncron: 0 3 * * 1\n")])
    assert (args.host, args.cron) == (HOST, "0 3 * * 1")
    message = refused(["schedule", "--params", params_file("cron: 0 3 * * 1\n", "no-host.yaml")], capsys)
    assert "required: --host (on the command line or in" in message, message
    assert "required: --host" in refused(["submit"], capsys)  # without a file: argparse's own check


def test_the_files_values_reach_the_verbs_body(params_file, tmp_path, monkeypatch, capsys):
    """`cessl run --params` runs the verb on the file's values: here its preflight refuses the
    file's data folder before any work (nothing is written)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["run", "--params", params_file("source: nowhere\nmax-steps: 5\n")]) == EXIT_USAGE
    assert f"{work / 'nowhere'}: data folder not found" in capsys.readouterr().err
    assert list(work.iterdir()) == []
