"""Every file a user hands in is read by one safe reader (``pipeline/core/files.py``), and every
value in it meets the constraints the same value has as a flag.

Each hostile input a red team tried goes through the real entry points: ``cessl sites --file F
list`` (``sites.yaml``), ``cessl run --params F``, ``cessl audit verify --trust-file F`` and
``cessl access keygen --trust F`` (the signing trust file) and ``cessl access init --passwords F``;
each answer is one line naming the file (and the line), never a traceback, a hang or a blow-up.
Also: ``access check`` against a server that is not MLflow, a tracking URI with a password, and
the redactor's whole-token rule.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml.errors import EXIT_BAD_FILE, EXIT_UNAVAILABLE, EXIT_USAGE, ParameterError, ServiceUnavailableError
from pipeline import cli
from pipeline.cli.preflight import check_tracking
from pipeline.core.constraints import MAX_INT, MAX_RANK, MAX_SEED
from pipeline.core.files import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES
from pipeline.core.logsafe import MASK, redact
from pipeline.core.sites import SitesFileError, load_sites, new_site, parse_sites
from pipeline.registry.signing import load_trust

KEY = "ed25519:" + base64.b64encode(bytes(range(32))).decode()  # a valid 32-byte public key


@dataclass
class Outcome:
    code: int
    lines: list[str]
    seconds: float


def cessl(argv: list[str], capsys: pytest.CaptureFixture) -> Outcome:
    """``cessl ARGV`` in this process: its exit code (a parser's error too) and stderr's lines."""
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    seconds = time.perf_counter() - start
    return Outcome(code, [line for line in capsys.readouterr().err.splitlines() if line.strip()], seconds)


def one_line(outcome: Outcome, code: int, *named: str) -> str:
    """The outcome is exit ``code`` with one stderr line (no traceback) naming each of ``named``."""
    assert outcome.code == code, outcome
    assert len(outcome.lines) == 1 and "Traceback" not in outcome.lines[0], outcome.lines
    for name in named:
        assert name in outcome.lines[0], (name, outcome.lines[0])
    return outcome.lines[0]


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "data" / "a").mkdir(parents=True)
    return tmp_path


# --------------------------------------------------------------------------- hostile files


def alias_bomb(levels: int = 9) -> str:
    """The billion laughs: 9 ** levels strings once expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


HEAD = "# two lines before the problem\n# so that its line is 3\n"
# (id, content, what the one line says, its line or None)
HOSTILE_YAML: list[tuple[str, str | bytes, str, int | None]] = [
    ("alias bomb", HEAD + alias_bomb(), f"more than {MAX_NODES} values once its aliases are expanded", None),
    ("python tag", HEAD + "x: !!python/object:os.system {}\n", "tag !!python/object:os.system is not accepted", 3),
    ("custom tag", HEAD + "x: !secret abc\n", "tag !secret is not accepted", 3),
    ("binary tag", HEAD + "x: !!binary aGVsbG8=\n", "tag !!binary is not accepted", 3),
    ("deep nesting", HEAD + "x: " + "[" * 50_000 + "]" * 50_000 + "\n", f"nested deeper than {MAX_DEPTH} levels", 3),
    ("recursive alias", HEAD + "x: &x [*x]\n", "refers to itself", 3),
    ("NUL escape", HEAD + 'x: "\\0bad"\n', "a NUL character", 3),
    ("key twice", HEAD + "x: 1\nx: 2\n", "key 'x' given twice (first on line 3)", 4),
    ("not YAML", HEAD + "x: [\n", "not valid YAML", 4),
    ("binary file", HEAD.encode() + b"x: \xff\xfe\x00\x01\n", "not UTF-8 text", 3),
]


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# An expanded alias bomb or a read that blocks takes minutes (the red team's hung at 2 GB); a
# refusal takes milliseconds plus the command's start-up, which a loaded 2-core machine stretches.
QUICK_S = 5.0

# Each file's entry point: (argv for the file, exit code of a refused file, what the line starts with).
ENTRY_POINTS: dict[str, tuple[Callable[[str], list[str]], int, str]] = {
    "sites.yaml": (lambda f: ["sites", "--file", f, "list"], EXIT_BAD_FILE, "cessl: error: "),
    "--params": (lambda f: ["run", "--params", f], EXIT_USAGE, "cessl run: error: --params "),
    "trust file": (lambda f: ["audit", "verify", "--trust-file", f], EXIT_USAGE, "cessl: error: trust file "),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(("content", "says", "line"), [pytest.param(*c[1:], id=c[0]) for c in HOSTILE_YAML])
def test_a_hostile_yaml_file_is_one_line_naming_file_and_line(entry, content, says, line, work, capsys):
    argv, code, prefix = ENTRY_POINTS[entry]
    path = _write(work / "hostile.yaml", content)
    outcome = cessl(argv(str(path)), capsys)
    message = one_line(outcome, code, says)
    where = f"{path}:{line}: " if line is not None else f"{path}:"
    assert message.startswith(prefix + where), message
    assert outcome.seconds < QUICK_S, f"{entry}: {outcome.seconds:.2f} s"  # an alias bomb is never expanded


def _not_regular(work: Path) -> Iterator[tuple[str, str, str]]:
    """(id, path, what the line says) of what is not a small regular file."""
    yield "a folder", str(work / "data"), "a folder, not a regular file"
    yield "/dev/zero", "/dev/zero", "a character device, not a regular file"
    big = work / "big.yaml"
    with big.open("w") as out:  # 5 MB of comments: refused from its size, not read
        out.write(("# padding" + " " * 90 + "\n") * (5 * 1024 * 1024 // 100))
    yield "a 5 MB file", str(big), f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB (5 MiB)"


@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "passwords", "calibration"])
def test_what_is_not_a_small_regular_file_is_refused_without_reading_it(entry, work, capsys):
    argv, code, _ = ENTRY_POINTS.get(entry) or OTHER_FILES[entry]
    for what, path, says in _not_regular(work):
        outcome = cessl(argv(path), capsys)
        one_line(outcome, code, path, says)
        assert outcome.seconds < QUICK_S, (what, outcome.seconds)


def _passwords_argv(path: str) -> list[str]:
    return ["access", "init", "--pipeline-user", "pipeline", "--passwords", path]


def _calibration_argv(path: str) -> list[str]:
    return ["predict", "--model", "models:/m@champion", "src", "--calibration", path]


# The user files that are not YAML: (argv, exit code of a refused file, prefix) as ENTRY_POINTS.
OTHER_FILES: dict[str, tuple[Callable[[str], list[str]], int, str]] = {
    "passwords": (_passwords_argv, EXIT_USAGE, ""),
    "calibration": (_calibration_argv, EXIT_BAD_FILE, ""),
}


def test_a_calibration_that_is_not_one_is_refused_before_any_model_loads(work, capsys):
    path = _write(work / "calibration.json", '{"schema": 99}')
    outcome = cessl(_calibration_argv(str(path)), capsys)  # the store is never opened (no --tracking-uri)
    one_line(outcome, EXIT_BAD_FILE, str(path), "not a usable calibration.json")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "passwords"])
def test_a_fifo_is_refused_without_blocking(entry, work, capsys):
    argv, code, _ = ENTRY_POINTS.get(entry) or (_passwords_argv, EXIT_USAGE, "")
    fifo = work / "fifo.yaml"
    os.mkfifo(fifo)
    result: list[Outcome] = []
    thread = threading.Thread(target=lambda: result.append(cessl(argv(str(fifo)), capsys)), daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # blocked on the FIFO: give it a writer so the thread ends, and fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{entry}: blocked reading a FIFO")
    one_line(result[0], code, str(fifo), "a FIFO (named pipe), not a regular file")


def test_a_binary_or_nul_password_file_is_one_line_that_never_echoes_it(work, capsys):
    binary = _write(work / "passwords", b"pipeline:\xff\xfe-secret-bytes\n")
    message = one_line(cessl(_passwords_argv(str(binary)), capsys), EXIT_USAGE, f"{binary}:1: not UTF-8 text")
    nul = _write(work / "nul-passwords", "# users\npipeline:abc\x00def-password\n")
    message += one_line(cessl(_passwords_argv(str(nul)), capsys), EXIT_USAGE, f"{nul}:2: a NUL character")
    assert "secret-bytes" not in message and "def-password" not in message


# --------------------------------------------------------------------------- standard YAML is accepted


def test_merge_keys_and_aliases_are_standard_yaml_and_accepted(work, capsys):
    sites = _write(
        work / "sites.yaml",
        "version: 1\nx-defaults: &defaults {labelled_ratio: 0.2, method: fixmatch}\nsites:\n"
        "  hospital-a:\n    <<: *defaults\n    source: data/a\n"
        "  hospital-b:\n    <<: *defaults\n    source: s3://bucket/b\n    method: cessl\n",
    )
    assert cessl(["sites", "--file", sites, "list"], capsys).code == 0
    registry = load_sites(sites)
    assert dict(registry.get("hospital-a").overrides) == {"labelled_ratio": 0.2, "method": "fixmatch"}
    assert dict(registry.get("hospital-b").overrides) == {"labelled_ratio": 0.2, "method": "cessl"}  # own key wins

    from pipeline.cli.options import parse_args
    from pipeline.core.params import DEMO_PARAMS, params_from_args

    merged = _write(work / "merged.yaml", "<<: {seed: 3, max-steps: 40}\nseed: 4\n")
    parsed = params_from_args(parse_args(cli.build_parser(), ["run", "--params", str(merged)]), DEMO_PARAMS)
    assert (parsed.seed, parsed.max_steps) == (4, 40)

    trust = _write(work / "trust.yaml", f"version: 1\nsigners:\n  <<: {{alice: &k '{KEY}'}}\n  bob: *k\n")
    assert set(load_trust(trust).signers) == {"alice", "bob"}
    keys = work / "keys"
    assert cessl(["access", "keygen", "--out", keys, "--name", "carol", "--trust", trust], capsys).code == 0
    assert set(load_trust(trust).signers) == {"alice", "bob", "carol"}


# --------------------------------------------------------------------------- the values: file = flag


SITE_VALUES: list[tuple[str, str]] = [  # (site lines, what the line says)
    ("source: s3://", "names no bucket"),
    ("source: s3://bucket/../../x", "'..' segment"),
    ("source: ../../../../etc", "leaves the registry file's folder"),
    ('source: "data/a\\0x"', "a NUL character"),
    (
        "source: data/a\n    r: 99999999999999999999",
        f"-r 99999999999999999999: must be an integer >= 1 and <= {MAX_RANK}",
    ),
    ("source: data/a\n    seed: 1.5", "--seed 1.5: must be an integer, not a fraction"),
    ("source: data/a\n    labelled_ratio: 5", "--labelled-ratio 5: must be a finite number > 0 and < 1"),
    ("source: data/a\n    seed: -1", f"--seed -1: must be an integer >= 0 and <= {MAX_SEED}"),
]


@pytest.mark.parametrize(("lines", "says"), SITE_VALUES, ids=[s for s, _ in SITE_VALUES])
def test_a_bad_site_value_is_refused_from_the_file_with_its_line(lines, says, work, capsys):
    path = _write(work / "sites.yaml", f"version: 1\nsites:\n  hospital-a:\n    {lines}\n")
    message = one_line(cessl(["sites", "--file", path, "list"], capsys), EXIT_BAD_FILE, says)
    assert message.startswith(f"cessl: error: {path}:"), message


# the same values through `cessl sites add`: refused, and nothing written
SITE_ADD: list[tuple[list[str], str, int]] = [
    (["hospital-x", "../../../../etc"], "leaves the registry file's folder", EXIT_USAGE),
    (["hospital-x", "missing"], "folder", EXIT_USAGE),
    (["hospital-x", "s3://"], "names no bucket", EXIT_USAGE),
    (["hospital-x", "s3://bucket/../../x"], "'..' segment", EXIT_USAGE),
    (["hospital-x", "data/a", "-r", "99999999999999999999"], f"must be an integer >= 1 and <= {MAX_RANK}", EXIT_USAGE),
    (["hospital-x", "data/a", "--seed", str(MAX_SEED + 1)], f"<= {MAX_SEED}", EXIT_USAGE),
    (["hospital-x", "data/a", "--batch-size", str(MAX_INT + 1)], f"<= {MAX_INT}", EXIT_USAGE),
]


@pytest.mark.parametrize(("argv", "says", "code"), SITE_ADD, ids=[" ".join(a) for a, _, _ in SITE_ADD])
def test_sites_add_refuses_what_the_file_refuses_and_writes_nothing(argv, says, code, work, capsys):
    one_line(cessl(["sites", "add", *argv], capsys), code, says)
    assert not (work / "sites.yaml").exists()


def test_sites_add_writes_what_the_file_reads_back(work, capsys):
    outside = work.parent / f"{work.name}-outside"
    outside.mkdir()
    assert cessl(["sites", "add", "hospital-a", "data/a", "--seed", str(MAX_SEED), "-r", "8"], capsys).code == 0
    assert cessl(["sites", "add", "hospital-b", str(outside)], capsys).code == 0  # an absolute path that exists
    assert cessl(["sites", "add", "hospital-c", "s3://bucket/c/d"], capsys).code == 0
    registry = load_sites(work / "sites.yaml")
    assert [s.source for s in registry] == [str((work / "data" / "a").resolve()), str(outside), "s3://bucket/c/d"]
    assert dict(registry.get("hospital-a").overrides) == {"seed": MAX_SEED, "r": 8}


_PARTS = st.sampled_from(["..", ".", "a", "b", "data", "", "x\x00y", "s3:", "bucket"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(["", "", "s3://", "/", "ftp://"]), parts=st.lists(_PARTS, min_size=1, max_size=5))
def test_the_file_and_sites_add_agree_on_every_source(tmp_path_factory, scheme, parts):
    """One check (pipeline.core.sites.site_problems) for both: a source the file refuses,
    `sites add` refuses, and the other way round (the folder made where it can be)."""
    root = tmp_path_factory.getbasetemp() / "agree" / "net"
    root.mkdir(parents=True, exist_ok=True)
    source = scheme + "/".join(parts)
    registry_file = root / "sites.yaml"
    normal = os.path.normpath(source) if source.strip() and "://" not in source and "\x00" not in source else ""
    if normal and not normal.startswith((os.pardir, "/")):
        (root / normal).mkdir(parents=True, exist_ok=True)  # existence is `sites add`'s only extra check
    text = yaml.safe_dump({"version": 1, "sites": {"hospital-a": {"source": source}}})
    try:
        parse_sites(text, registry_file)
        file_ok = True
    except SitesFileError:
        file_ok = False
    try:
        new_site("hospital-a", source, {}, "", registry_file)
        add_ok = True
    except ParameterError:
        add_ok = False
    if source.startswith("/") and "\x00" not in source and "://" not in source and not Path(source).is_dir():
        assert file_ok and not add_ok  # an absolute folder of the cluster's pods: `sites add` checks it here
    else:
        assert file_ok == add_ok, (source, file_ok, add_ok)
    if file_ok and "://" not in source and not source.startswith("/"):
        assert os.path.realpath(root / source).startswith(str(root.resolve()))  # never outside its root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(-(2**70), 2**70) | st.integers(-2, 2) | st.sampled_from([MAX_SEED, MAX_SEED + 1]))
def test_a_seed_is_refused_alike_from_a_file_a_flag_and_a_grid(tmp_path_factory, seed):
    """`seed: N` in --params, `sites add --seed N` and `compare --seeds N`: refused at parse
    time exactly when N is outside [0, MAX_SEED], each naming the range."""
    from pipeline.cli.options import parse_args

    params = tmp_path_factory.getbasetemp() / "seed.yaml"
    params.write_text(f"seed: {seed}\n")
    valid = 0 <= seed <= MAX_SEED
    for argv in (["run", "--params", str(params)], ["sites", "add", "a", "src", "--seed", str(seed)]):
        try:
            parse_args(cli.build_parser(), argv)
            refused = False
        except SystemExit:
            refused = True
        assert refused != valid, (argv, seed)
    from pipeline.cli.verbs import grid_type

    try:
        grid_type("seed", "0")(str(seed))
        assert valid
    except Exception as err:  # argparse.ArgumentTypeError
        assert not valid and f"<= {MAX_SEED}" in str(err)


def test_compare_refuses_a_huge_seed_at_parse_time(work, capsys):
    outcome = cessl(["compare", "--seeds", "99999999999999999999999", "--compile"], capsys)
    one_line(outcome, EXIT_USAGE, "--seeds", f"must be an integer >= 0 and <= {MAX_SEED}")
    assert not list(work.glob("*.yaml"))  # no pipeline written


# --------------------------------------------------------------------------- servers


@dataclass
class FakeServer:
    """A local HTTP server: ``answer(path, authorization) -> (status, json body or None)``."""

    answer: Callable[[str, str], tuple[int, object]]
    seen: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization", "")
                fake.seen.append((self.path, auth))
                status, body = fake.answer(self.path, auth)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if body is not None:
                    self.wfile.write(json.dumps(body).encode())

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def serve() -> Iterator[Callable[[Callable[[str, str], tuple[int, object]]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(answer: Callable[[str, str], tuple[int, object]]) -> FakeServer:
        servers.append(FakeServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_access_check_against_a_server_that_is_not_mlflow_fails_clearly(serve, work, capsys):
    server = serve(lambda path, auth: (404, None))
    url = f"http://127.0.0.1:{server.port}"
    one_line(
        cessl(["access", "check", "cessl-ecg", "--tracking-uri", url], capsys), EXIT_UNAVAILABLE, url, "not an MLflow"
    )
    from pipeline.registry.access import authenticated_user

    with pytest.raises(ServiceUnavailableError, match="not an MLflow tracking server"):
        authenticated_user(url)  # what promote and rollback ask: never "no authentication" here


def test_a_password_in_the_uri_is_sent_as_credentials_and_never_shown(serve, work, capsys):
    password = "s3cret pass/word"  # percent-encoded in the URI
    expected = "Basic " + base64.b64encode(f"bob:{password}".encode()).decode()

    def answer(path: str, auth: str) -> tuple[int, object]:
        if auth != expected:
            return 401, None
        if path.startswith("/api/2.0/mlflow/users/current"):
            return 200, {"user": {"username": "bob", "is_admin": True}}
        return (200, None) if path == "/health" else (404, None)

    server = serve(answer)
    uri = f"http://bob:s3cret%20pass%2Fword@127.0.0.1:{server.port}"
    assert check_tracking(uri, writes=False) == uri
    assert server.seen[-1] == ("/health", expected)  # the URL itself carries no user:password@
    assert cessl(["access", "check", "cessl-ecg", "--tracking-uri", uri], capsys).code == 0
    wrong = uri.replace("s3cret%20pass", "wrong-pass")
    with pytest.raises(ServiceUnavailableError) as refused:
        check_tracking(wrong, writes=False)
    assert "refuses the credentials" in str(refused.value) and "wrong-pass" not in str(refused.value)
    assert "bob:***@" in str(refused.value)


# --------------------------------------------------------------------------- the redactor


def test_the_redactor_masks_whole_secrets_never_parts_of_words():
    message = "password of 'pipeline' (--passwords) is shorter than 12 characters; short: the old one"
    assert redact(message, ["short"]) == message.replace("short:", f"{MASK}:")
    assert redact("http://bob:pa55word@host:5000 and pa55words", ["pa55word"]) == (
        f"http://bob:{MASK}@host:5000 and pa55words"
    )


_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=4, max_size=12)
_SEP = st.sampled_from([" ", ":", "'", "=", "@", "\n"])


@settings(max_examples=100, deadline=None)
@given(secret=_WORD, before=_WORD | st.just(""), after=_WORD | st.just(""), sep=_SEP)
def test_a_secret_is_masked_as_a_token_and_only_as_one(secret, before, after, sep):
    assert redact(f"x{sep}{secret}{sep}y", [secret]) == f"x{sep}{MASK}{sep}y"
    text = f"x{sep}{before}{secret}{after}{sep}y"
    if before or after:  # part of a longer word: nothing masked, nothing hinted
        assert redact(text, [secret]) == text
