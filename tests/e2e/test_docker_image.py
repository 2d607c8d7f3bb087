"""The project image builds offline, runs the CLI, holds the code, and runs as non-root.

Starts its own Docker engine (tests/docker_support.py); skips only where none can be
installed or started. The image built here (``cessl_image``) is reused by later tests,
e.g. the demo DAG on kfp.local.DockerRunner.
"""

import json

import pytest

# the first test installs and starts the engine and builds the image (minutes; reused after)
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

IMPORT_CHECK = """
import importlib, json, os, sys
mods = ["ml", "components", "pipeline", "pipeline.cli", "torch", "mlflow", "kfp", "kfp.kubernetes", "dvc", "wfdb", "boto3"]
versions = {}
for name in mods:
    mod = importlib.import_module(name)
    versions[name] = getattr(mod, "__version__", "")
print(json.dumps({"uid": os.getuid(), "python": sys.version.split()[0], "versions": versions,
                  "cuda_build": importlib.import_module("torch").version.cuda}))
"""


def test_cli_help(docker_engine, cessl_image):
    out = docker_engine.docker("run", "--rm", cessl_image, "--help", timeout=120)
    assert "usage: cessl" in out.stdout


def test_code_and_dependencies_import(docker_engine, cessl_image):
    out = docker_engine.docker("run", "--rm", "--entrypoint", "python3", cessl_image, "-c", IMPORT_CHECK, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["python"].startswith("3.11.")
    assert report["versions"]["torch"].startswith("2.13.0")
    assert report["versions"]["mlflow"] == "3.17.2"
    assert report["versions"]["kfp"] == "2.17.3"
    assert report["cuda_build"] is None  # the default image is the CPU build


def test_runs_as_non_root(docker_engine, cessl_image):
    user = docker_engine.docker("image", "inspect", "--format", "{{.Config.User}}", cessl_image).stdout.strip()
    assert user and user.split(":")[0] not in ("", "0", "root")
    uid = docker_engine.docker("run", "--rm", "--entrypoint", "id", cessl_image, "-u", timeout=120).stdout.strip()
    assert uid == "10001"
    # the venv is not writable by the runtime user; its home is
    probe = "import os; print(os.access('/opt/venv/lib', os.W_OK), os.access(os.path.expanduser('~'), os.W_OK))"
    out = docker_engine.docker("run", "--rm", "--entrypoint", "python3", cessl_image, "-c", probe, timeout=120)
    assert out.stdout.split() == ["False", "True"]


def test_image_has_no_secrets_or_sources_beyond_the_package(docker_engine, cessl_image):
    env = json.loads(docker_engine.docker("image", "inspect", "--format", "{{json .Config.Env}}", cessl_image).stdout)
    assert not [e for e in env if e.split("=")[0] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    listing = docker_engine.docker(
        "run", "--rm", "--entrypoint", "sh", cessl_image, "-c", "ls -a /src /wheels /home/cessl 2>&1; true", timeout=120
    ).stdout
    assert "No such file" in listing  # builder-only paths (/src, /wheels) are not in the runtime image
    assert ".git" not in listing and ".venv" not in listing


def test_container_reaches_host_s3_with_env_credentials(docker_engine, cessl_image, s3_server, s3_bucket):
    """What pipeline steps do: credentials come from the environment only."""
    code = (
        "import boto3; from botocore.config import Config;"
        "c = boto3.client('s3', config=Config(s3={'addressing_style': 'path'}));"
        f"c.put_object(Bucket='{s3_bucket}', Key='from-container.txt', Body=b'ok')"
    )
    env_args = [arg for name in s3_server.env() for arg in ("--env", name)]  # values from our env, not argv
    docker_engine.docker(
        "run",
        "--rm",
        "--network",
        "host",
        *env_args,
        "--entrypoint",
        "python3",
        cessl_image,
        "-c",
        code,
        timeout=180,
        env_extra=s3_server.env(),
    )
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="from-container.txt")["Body"].read()
    assert body == b"ok"


def test_kfp_local_docker_runner_runs_a_component_on_the_image(docker_engine, cessl_image, tmp_path, monkeypatch):
    """The recipe for running the DAG in containers locally (kfp.local.DockerRunner).

    - `entrypoint=[]`: the image's ENTRYPOINT is `cessl`; KFP gives a full command
      (`sh -c ...`), as Kubernetes does with `command:`;
    - the pipeline root must be writable by the image's non-root user (uid 10001);
    - `install_kfp_package=False`: kfp is in the image, nothing is pip-installed.
    """
    from kfp import dsl, local

    @dsl.component(base_image=cessl_image, install_kfp_package=False)
    def scale(x: float, factor: float) -> float:
        import os

        import ml  # the project package is importable in the step

        assert os.getuid() != 0 and ml is not None
        return x * factor

    @dsl.pipeline
    def tiny(x: float = 1.0) -> float:
        return scale(x=x, factor=2.5).output

    root = tmp_path / "pipeline-root"
    root.mkdir()
    root.chmod(0o777)
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    local.init(runner=local.DockerRunner(entrypoint=[]), pipeline_root=str(root), raise_on_error=True)
    assert tiny(x=4.0).output == 10.0


def test_cuda_build_path_installs_python_from_apt(docker_engine, tmp_path):
    """The CUDA build's extra step (scripts/build_image.sh --cuda: a base without Python 3.11,
    PYTHON_APT_PACKAGES / PYTHON) built for real up to its `python` stage, with the local base
    standing in for nvidia/cuda (no registry here), and a venv made with that interpreter.
    The CUDA torch wheel itself (several GB from the CUDA index) is not fetched here."""
    from docker_support import REPO, ensure_base_image

    base = ensure_base_image(docker_engine)
    tag = "cessl-python-stage:test"
    proc = docker_engine.docker(
        "build",
        "--pull=false",
        "--target",
        "python",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        "PYTHON_APT_PACKAGES=python3.11 python3.11-venv",
        "-t",
        tag,
        "-f",
        str(REPO / "Dockerfile"),
        str(tmp_path),  # the python stage needs nothing from the context
        timeout=900,
        check=False,
    )
    if proc.returncode != 0 and "Temporary failure resolving" in proc.stderr + proc.stdout:
        pytest.skip("no apt mirror reachable from a docker build here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = docker_engine.docker(
        "run", "--rm", "--entrypoint", "sh", tag, "-c", "python3.11 -m venv /tmp/v && /tmp/v/bin/python -V", timeout=120
    )
    assert out.stdout.strip().startswith("Python 3.11.")
    docker_engine.docker("image", "rm", tag, check=False)
