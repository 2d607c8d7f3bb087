#!/usr/bin/env bash
# A private, local Docker engine for building and running the CE-SSL image (tests, CI,
# laptops without a system daemon). Used by tests/docker_support.py; usable by hand:
#
#   scripts/docker_engine.sh install              # apt: docker.io + mmdebstrap (root)
#   eval "$(scripts/docker_engine.sh start /tmp/cessl-docker)"   # sets DOCKER_HOST
#   scripts/docker_engine.sh base-image [TAG]     # local Debian base (default cessl-base:test)
#   BASE_IMAGE=cessl-base:test scripts/build_image.sh
#   scripts/docker_engine.sh stop /tmp/cessl-docker
#   scripts/docker_engine.sh prebuild-background  # `make test`: the image, built ahead
#
# start RUN_DIR [DATA_ROOT]: dockerd with its own data root (default RUN_DIR/data), exec
# root and unix socket under RUN_DIR (keep RUN_DIR short: unix socket paths are limited
# to 108 bytes), in its own session; prints `export DOCKER_HOST=...` once it answers.
# Exit codes: 0 ok, 3 cannot install/start here (not root, no apt), 1 other errors.
#
# prebuild-background: `make test` starts it before the install and the test session. In the
# background it installs the engine, makes the base image and builds the project image into
# the shared data root (.cache/docker-data), then stops its engine; log .cache/prebuild.log.
# The install and the workers' start-up leave a core idle that the build uses, so the e2e
# tier finds the image cached instead of building it on its worker's critical path. It holds
# .cache/docker-prebuild.lock while it runs (tests/docker_support.py waits for it); it is only
# a cache warmer: where it fails or is skipped, the tests' fixture does the work (and reports).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER="${DOCKER:-/usr/bin/docker}"
START_TIMEOUT_S="${START_TIMEOUT_S:-60}"
BASE_SUITE="${BASE_SUITE:-bookworm}"
BASE_CACHE="${BASE_CACHE:-.cache/base-images}"
SHARED_DATA_ROOT=".cache/docker-data"
DATA_LOCK=".cache/docker-data.lock"  # tests/docker_support.py: held by whoever uses the shared root
PREBUILD_LOCK=".cache/docker-prebuild.lock"
PREBUILD_LOG=".cache/prebuild.log"
LOCAL_BASE_TAG="cessl-base:test"

log() { printf '[docker_engine] %s\n' "$*" >&2; }

cmd_install() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 && [[ -x "$DOCKER" ]] || missing+=(docker.io)
    command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
    if [[ ${#missing[@]} -eq 0 ]]; then return 0; fi
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "missing ${missing[*]} and cannot install them (needs root and apt-get)"
        return 3
    fi
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >&2; then
        log "apt-get install ${missing[*]} failed"
        return 3
    fi
}

cmd_start() {
    local run_dir="${1:?usage: start RUN_DIR [DATA_ROOT]}"
    local data_root="${2:-$run_dir/data}"
    command -v dockerd >/dev/null 2>&1 || { log "dockerd not installed (run: $0 install)"; return 3; }
    [[ "$(id -u)" == 0 ]] || { log "dockerd needs root here (no rootless setup)"; return 3; }
    mkdir -p "$run_dir" "$data_root"
    local sock="$run_dir/docker.sock"
    if (( ${#sock} > 100 )); then log "socket path too long: $sock"; return 1; fi
    export DOCKER_HOST="unix://$sock"
    if [[ -S "$sock" ]] && "$DOCKER" version >/dev/null 2>&1; then
        log "already running at $DOCKER_HOST"
    else
        # (fds 8 and 9, the prebuild's locks, are not inherited: they would outlive it)
        setsid dockerd --data-root "$data_root" --exec-root "$run_dir/exec" \
            --pidfile "$run_dir/dockerd.pid" -H "$DOCKER_HOST" \
            >"$run_dir/dockerd.log" 2>&1 </dev/null 8>&- 9>&- &
        local pid=$! waited=0
        until "$DOCKER" version >/dev/null 2>&1; do
            if ! kill -0 "$pid" 2>/dev/null; then
                log "dockerd exited while starting; log $run_dir/dockerd.log:"
                tail -20 "$run_dir/dockerd.log" >&2
                return 3
            fi
            if (( waited >= START_TIMEOUT_S * 5 )); then
                log "dockerd not answering after ${START_TIMEOUT_S} s; log $run_dir/dockerd.log"
                kill "$pid" 2>/dev/null || true
                return 1
            fi
            sleep 0.2
            waited=$((waited + 1))
        done
        echo "$pid" >"$run_dir/dockerd.pid.launcher"
        log "dockerd (pid $pid) ready at $DOCKER_HOST, data root $data_root"
    fi
    echo "export DOCKER_HOST=$DOCKER_HOST"
}

cmd_stop() {
    local run_dir="${1:?usage: stop RUN_DIR}"
    local pid=""
    for f in "$run_dir/dockerd.pid" "$run_dir/dockerd.pid.launcher"; do
        [[ -s "$f" ]] && { pid=$(cat "$f"); break; }
    done
    if [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null; then
        local stopped=0
        for _ in $(seq 1 150); do  # 30 s
            kill -0 "$pid" 2>/dev/null || { stopped=1; break; }
            sleep 0.2
        done
        if [[ "$stopped" == 1 ]]; then
            log "dockerd (pid $pid) stopped"
        else
            log "dockerd (pid $pid) did not stop in 30 s: SIGKILL to its process group"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            sleep 1
        fi
    fi
    # the engine leaves mounts (e.g. exec-root/netns/default) that block removing RUN_DIR
    local real mnt
    real=$(realpath "$run_dir")
    awk -v root="$real/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r | while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done
}

cmd_base_image() {
    local tag="${1:-cessl-base:test}"
    if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
        log "base image $tag present"
        echo "$tag"
        return 0
    fi
    command -v mmdebstrap >/dev/null 2>&1 || { log "mmdebstrap not installed (run: $0 install)"; return 3; }
    local tar="$BASE_CACHE/${BASE_SUITE}-python3.tar"
    if [[ ! -s "$tar" ]]; then
        mkdir -p "$BASE_CACHE"
        log "mmdebstrap $BASE_SUITE (python3, python3-venv) -> $tar (~30 s, Debian mirror)"
        local start=$SECONDS
        # shellcheck disable=SC2016  # "$1" is expanded by mmdebstrap's hook, not here
        mmdebstrap --mode=root --variant=apt --format=tar --quiet \
            --include=python3,python3-venv,ca-certificates,passwd \
            --aptopt='Acquire::Retries "3"' \
            --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
            "$BASE_SUITE" "$tar.partial" >&2
        mv "$tar.partial" "$tar"
        log "mmdebstrap done in $((SECONDS - start)) s"
    fi
    "$DOCKER" import --change 'CMD ["/bin/bash"]' "$tar" "$tag" >/dev/null
    log "imported $tar as $tag"
    echo "$tag"
}

cmd_prebuild_background() {
    mkdir -p .cache
    exec 9>"$PREBUILD_LOCK"
    if ! flock -n 9; then log "a prebuild is already running"; return 0; fi
    # the child inherits fd 9, and with it the lock, for as long as it runs
    setsid bash "$0" prebuild >"$PREBUILD_LOG" 2>&1 </dev/null &
    exec 9>&-
    log "building the image in the background (log $PREBUILD_LOG)"
}

cmd_prebuild() {
    local start=$SECONDS run_dir base python=python3
    exec 8>"$DATA_LOCK"
    if ! flock -n 8; then log "another session uses $SHARED_DATA_ROOT: no prebuild"; return 0; fi
    cmd_install || return 0
    run_dir=$(mktemp -d /tmp/cessl-prebuild-XXXXXX)
    # shellcheck disable=SC2064  # expand now: the trap must stop this engine
    trap "cmd_stop '$run_dir' >/dev/null 2>&1; rm -rf '$run_dir'" EXIT
    local started
    started=$(cmd_start "$run_dir" "$SHARED_DATA_ROOT") || return 0
    eval "$started"
    if "$DOCKER" image inspect python:3.11-slim >/dev/null 2>&1; then base=python:3.11-slim; else base=$(cmd_base_image "$LOCAL_BASE_TAG"); fi
    # the project venv's Python once installed (`pip wheel` must not race its install)
    [[ -f .venv/.installed ]] && python=.venv/bin/python
    BASE_IMAGE="$base" PYTHON="$python" bash scripts/build_image.sh >/dev/null
    log "prebuild done in $((SECONDS - start)) s"
}

case "${1:-}" in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    base-image) shift; cmd_base_image "$@" ;;
    prebuild-background) cmd_prebuild_background ;;
    prebuild) cmd_prebuild ;;
    *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
