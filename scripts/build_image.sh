#!/usr/bin/env bash
# Build the CE-SSL image offline.
#
#   1. a wheelhouse of every runtime dependency is made on the host with `pip wheel`
#      into .cache/wheelhouse/<key>/ (key = hash of the pinned dependencies, the torch
#      index and the Python tag); an existing complete wheelhouse is reused;
#   2. `DOCKER_BUILDKIT=1 docker build --pull=false` bind-mounts it (Dockerfile), so the
#      build needs no registry and no package index.
#
# Usage: scripts/build_image.sh [--cuda] [--wheelhouse-only] [--print-tag] [--print-plan]
#   --cuda           the GPU image: torch from the CUDA wheel index (default
#                    https://download.pytorch.org/whl/cu128; the wheels carry the CUDA
#                    runtime), on the CUDA base nvidia/cuda:12.8.1-base-ubuntu22.04 with
#                    python3.11 from apt (the build then needs an apt mirror and the
#                    wheelhouse the CUDA index: several GB); tag <version>-cuda
#   --print-plan     print what would be built (image, base, torch index and pin, build
#                    arguments, wheelhouse) and stop: builds nothing, needs no network
# Environment (all optional):
#   BASE_IMAGE       base image (default python:3.11-slim, with --cuda the CUDA base above;
#                    must exist locally offline)
#   IMAGE            tag to build (default localhost:5000/cessl:<version from pyproject>,
#                    with --cuda localhost:5000/cessl:<version>-cuda)
#   TORCH_INDEX_URL  take torch from this index when making the wheelhouse, e.g.
#                    https://download.pytorch.org/whl/cu128 for a GPU image (--cuda's default)
#   PYTHON_APT_PACKAGES / IMAGE_PYTHON  apt packages giving the image's Python 3.11 and its
#                    name, for a base without it (--cuda: "python3.11 python3.11-venv",
#                    python3.11; empty / python3 otherwise)
#   PYTHON           Python used for `pip wheel` (default .venv/bin/python, else python3);
#                    must be CPython 3.11 like the image. Its pip must be current: where it is
#                    older than 25, `pip wheel` runs in a venv of it with pip upgraded
#                    (.cache/pip-3.11 beside WHEEL_CACHE, made once): pip 23.x takes ~4 CPU minutes to
#                    resolve these dependencies against the index, pip 26 ~15 s, same wheels.
#   DOCKER           docker CLI with built-in BuildKit (default /usr/bin/docker from
#                    Debian's docker.io; a CLI without buildx cannot do BuildKit builds)
#   WHEEL_CACHE      wheelhouse root inside the repo (default .cache/wheelhouse)
#   BUILD_ARGS       extra arguments for `docker build` (word-split)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELHOUSE_ONLY=0
PRINT_TAG=0
PRINT_PLAN=0
CUDA=0
for arg in "$@"; do
    case "$arg" in
        --wheelhouse-only) WHEELHOUSE_ONLY=1 ;;
        --print-tag) PRINT_TAG=1 ;;
        --print-plan) PRINT_PLAN=1 ;;
        --cuda) CUDA=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "build_image.sh: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CUDA_BASE_IMAGE="nvidia/cuda:12.8.1-base-ubuntu22.04"
CUDA_TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128"
if [[ "$CUDA" == 1 ]]; then
    BASE_IMAGE="${BASE_IMAGE:-$CUDA_BASE_IMAGE}"
    TORCH_INDEX_URL="${TORCH_INDEX_URL:-$CUDA_TORCH_INDEX_URL}"
    PYTHON_APT_PACKAGES="${PYTHON_APT_PACKAGES-python3.11 python3.11-venv}"
    IMAGE_PYTHON="${IMAGE_PYTHON:-python3.11}"
    TAG_SUFFIX="-cuda"
else
    BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
    TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
    PYTHON_APT_PACKAGES="${PYTHON_APT_PACKAGES:-}"
    IMAGE_PYTHON="${IMAGE_PYTHON:-python3}"
    TAG_SUFFIX=""
fi
WHEEL_CACHE="${WHEEL_CACHE:-.cache/wheelhouse}"
DOCKER="${DOCKER:-/usr/bin/docker}"

# version, requirement list and wheelhouse key, from pyproject.toml
read -r VERSION KEY < <(TORCH_INDEX_URL="$TORCH_INDEX_URL" "$PYTHON" - <<'EOF'
import hashlib, os, sys, sysconfig, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = sorted(project["dependencies"])
tag = f"cp{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform()}"
digest = hashlib.sha256("\n".join(deps + [os.environ["TORCH_INDEX_URL"], tag, "layout-2"]).encode()).hexdigest()[:16]
print(project["version"], digest)
EOF
)
IMAGE="${IMAGE:-localhost:5000/cessl:${VERSION}${TAG_SUFFIX}}"
if [[ "$PRINT_TAG" == 1 ]]; then echo "$IMAGE"; exit 0; fi
WHEELHOUSE="${WHEEL_CACHE}/${KEY}"
BUILD_ARG_LIST=(
    --build-arg "BASE_IMAGE=${BASE_IMAGE}"
    --build-arg "PYTHON=${IMAGE_PYTHON}"
    --build-arg "PYTHON_APT_PACKAGES=${PYTHON_APT_PACKAGES}"
)

if [[ "$PRINT_PLAN" == 1 ]]; then
    TORCH_PIN=$("$PYTHON" -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"] if d.startswith("torch")))')
    printf 'image=%s\n' "$IMAGE"
    printf 'base_image=%s\n' "$BASE_IMAGE"
    printf 'torch=%s\n' "$TORCH_PIN"
    printf 'torch_index_url=%s\n' "${TORCH_INDEX_URL:-(wheelhouse default index: the CPU build)}"
    printf 'python=%s\n' "$IMAGE_PYTHON"
    printf 'python_apt_packages=%s\n' "$PYTHON_APT_PACKAGES"
    printf 'wheelhouse=%s\n' "$WHEELHOUSE"
    printf 'docker_build=DOCKER_BUILDKIT=1 %s build --pull=false' "$DOCKER"
    printf ' %q' "${BUILD_ARG_LIST[@]}" --label "org.opencontainers.image.version=${VERSION}"
    # shellcheck disable=SC2086
    [[ -z "${BUILD_ARGS:-}" ]] || printf ' %s' ${BUILD_ARGS}
    printf ' -t %q .\n' "$IMAGE"
    exit 0
fi

log() { printf '[build_image] %s\n' "$*" >&2; }

# A Python whose pip is current (>= 25): PYTHON where it has one, else a venv of PYTHON's made
# once beside WHEEL_CACHE with pip upgraded (~5 s).
pip_python() {
    local check='import sys; from importlib.metadata import version; sys.exit(int(version("pip").split(".")[0]) < 25)'
    if "$PYTHON" -c "$check" 2>/dev/null; then echo "$PYTHON"; return 0; fi
    local venv
    venv="$(dirname "$WHEEL_CACHE")/pip-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if ! "$venv/bin/python" -c "$check" 2>/dev/null; then
        rm -rf "$venv"
        if ! { "$PYTHON" -m venv "$venv" && "$venv/bin/python" -m pip install -q \
                --disable-pip-version-check --upgrade 'pip>=25'; } >/dev/null 2>&1; then
            log "cannot make a venv with a current pip in $venv: pip wheel runs with $PYTHON's pip (slower)"
            echo "$PYTHON"
            return 0
        fi
    fi
    echo "$venv/bin/python"
}

make_wheelhouse() {
    local tmp="${WHEELHOUSE}.partial.$$"
    local pip_py
    pip_py=$(pip_python)
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # requirements.txt: everything the image installs (read by the Dockerfile);
    # to-wheel.txt: what `pip wheel` fetches from the default index (torch may come from
    # TORCH_INDEX_URL instead)
    "$PYTHON" - "$tmp" "$TORCH_INDEX_URL" <<'EOF'
import sys, tomllib
out, torch_index = sys.argv[1], sys.argv[2]
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] + ["setuptools>=68", "wheel"]
open(f"{out}/requirements.txt", "w").write("\n".join(deps) + "\n")
if torch_index:
    deps = [d for d in deps if not d.replace(" ", "").startswith("torch")]
open(f"{out}/to-wheel.txt", "w").write("\n".join(deps) + "\n")
EOF
    local pip_log="$tmp/pip-wheel.log"
    if [[ -n "$TORCH_INDEX_URL" ]]; then
        local torch_pin
        torch_pin=$("$PYTHON" -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"] if d.startswith("torch")))')
        log "torch ($torch_pin) from $TORCH_INDEX_URL"
        "$pip_py" -m pip wheel --disable-pip-version-check -q -w "$tmp" \
            --index-url "$TORCH_INDEX_URL" "$torch_pin" >>"$pip_log" 2>&1 \
            || { tail -30 "$pip_log" >&2; return 1; }
    fi
    # sdists (e.g. kfp-server-api) are built into wheels here, on the host
    "$pip_py" -m pip wheel --disable-pip-version-check -q -w "$tmp" --find-links "$tmp" \
        -r "$tmp/to-wheel.txt" >>"$pip_log" 2>&1 \
        || { tail -30 "$pip_log" >&2; return 1; }
    touch "$tmp/.complete"
    rm -rf "$WHEELHOUSE"
    mv "$tmp" "$WHEELHOUSE"
}

if [[ -f "$WHEELHOUSE/.complete" ]]; then
    log "reusing wheelhouse $WHEELHOUSE"
else
    log "making wheelhouse $WHEELHOUSE (pip wheel, once per dependency set)"
    start=$SECONDS
    make_wheelhouse
    log "wheelhouse ready in $((SECONDS - start)) s: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
fi
if [[ "$WHEELHOUSE_ONLY" == 1 ]]; then echo "$WHEELHOUSE"; exit 0; fi

if ! "$DOCKER" version >/dev/null 2>&1; then
    log "no Docker engine answers '$DOCKER version' (DOCKER_HOST=${DOCKER_HOST:-unset});"
    log "start one, e.g.: eval \"\$(scripts/docker_engine.sh start)\""
    exit 1
fi

# The Dockerfile bind-mounts the fixed path .cache/wheelhouse/build: point it (hard
# links, no copy) at the selected wheelhouse. One build at a time per checkout.
BUILD_WHEELS="${WHEEL_CACHE}/build"
exec 9>"${WHEEL_CACHE}/.build.lock"
flock 9
rm -rf "$BUILD_WHEELS"
cp -al "$WHEELHOUSE" "$BUILD_WHEELS"

log "building $IMAGE from $BASE_IMAGE"
start=$SECONDS
# shellcheck disable=SC2086
DOCKER_BUILDKIT=1 "$DOCKER" build --pull=false \
    "${BUILD_ARG_LIST[@]}" \
    --label "org.opencontainers.image.version=${VERSION}" \
    ${BUILD_ARGS:-} \
    -t "$IMAGE" . >&2
log "built $IMAGE in $((SECONDS - start)) s"
echo "$IMAGE"
