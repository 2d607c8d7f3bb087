# CE-SSL runtime image: the `cessl` command line, the pipeline components and the MLflow
# server, in one image that every Kubeflow step (and deploy/mlflow.yaml) runs.
#
# Built OFFLINE from a wheelhouse made on the host (hospital sites are often air-gapped):
#     scripts/build_image.sh        # pip wheel into .cache/wheelhouse/<key> (once), then
#                                   # DOCKER_BUILDKIT=1 docker build (this file)
# By hand (any directory of wheels holding a requirements.txt of what to install):
#     cp -al .cache/wheelhouse/<key> .cache/wheelhouse/build
#     DOCKER_BUILDKIT=1 docker build --pull=false -t localhost:5000/cessl:0.1.0 .
#
# Build arguments
#   BASE_IMAGE       any Debian/Ubuntu image with python3.11 and python3-venv
#                    (default python:3.11-slim; tests use a local mmdebstrap bookworm base),
#                    or one without Python 3.11 plus PYTHON_APT_PACKAGES to install it.
#   PYTHON           the interpreter the venv is made with (default python3; python3.11
#                    on a base whose python3 is another version)
#   PYTHON_APT_PACKAGES  empty (default): nothing is installed; else apt packages that give
#                    PYTHON (this one step then needs an apt mirror), e.g.
#                    "python3.11 python3.11-venv" on nvidia/cuda:*-ubuntu22.04.
#   GPU image: `scripts/build_image.sh --cuda` = the wheelhouse with torch from the CUDA
#   index (https://download.pytorch.org/whl/cu128: the wheels carry the CUDA runtime
#   libraries) + BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04 (the NVIDIA runtime's
#   environment; Ubuntu 22.04 has python3.11 in universe) + the two arguments above.
#   `scripts/build_image.sh --cuda --print-plan` shows what it would build.
#   TORCH_INDEX_URL  empty (default): torch comes from the wheelhouse (the CPU build here).
#                    e.g. https://download.pytorch.org/whl/cu128: torch==TORCH_VERSION is
#                    installed from that index first (this one step then needs the
#                    network). Offline GPU builds instead make the wheelhouse with it:
#                    TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 scripts/build_image.sh
#
# The wheels are read from .cache/wheelhouse/build in the build context: bind-mounted,
# never copied into a layer (a fixed path: the built-in BuildKit frontend does not expand
# build arguments in --mount sources). BuildKit is required (RUN --mount); no "# syntax="
# line on purpose, so no frontend image is fetched from a registry.
#
# Layers: dependencies (changes with the wheelhouse only) / user / the project (a small layer
# rebuilt on every code change) / environment. The runtime stage builds on the deps stage
# itself: the venv (~1.5 GB) is written once, not copied into a second layer.

ARG BASE_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- python
# The base with its Python: as is (default), or with PYTHON_APT_PACKAGES installed.
FROM ${BASE_IMAGE} AS python

ARG PYTHON_APT_PACKAGES=""
SHELL ["/bin/sh", "-eu", "-c"]

# hadolint ignore=DL3008,SC2086
RUN if [ -n "${PYTHON_APT_PACKAGES}" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${PYTHON_APT_PACKAGES}; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# --------------------------------------------------------------------------- deps
FROM python AS deps

ARG PYTHON=python3
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

SHELL ["/bin/sh", "-eu", "-c"]

RUN --mount=type=bind,source=.cache/wheelhouse/build,target=/wheels \
    "${PYTHON}" -m venv /opt/venv; \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi; \
    /opt/venv/bin/pip install --no-index --find-links /wheels -r /wheels/requirements.txt

# --------------------------------------------------------------------------- src
# Only what the package needs (README.m[d]: optional, pyproject names it as the readme).
FROM scratch AS src
COPY pyproject.toml README.m[d] /src/
COPY ml /src/ml
COPY components /src/components
COPY pipeline /src/pipeline

# --------------------------------------------------------------------------- runtime
FROM deps AS runtime

ARG CESSL_UID=10001
LABEL org.opencontainers.image.title="cessl" \
      org.opencontainers.image.description="CE-SSL: semi-supervised LoRA fine-tuning of ECG transformers (Kubeflow pipeline)" \
      org.opencontainers.image.licenses="MIT"

SHELL ["/bin/sh", "-eu", "-c"]

RUN groupadd --gid "${CESSL_UID}" cessl \
    && useradd --uid "${CESSL_UID}" --gid cessl --no-log-init --create-home --home-dir /home/cessl \
        --shell /usr/sbin/nologin cessl

# The project: sources are mounted from the `src` stage and installed (no network, no
# dependency resolution); they are not left in the image.
RUN --mount=type=bind,from=src,source=/src,target=/mnt/src \
    cp -r /mnt/src /tmp/cessl-src \
    && /opt/venv/bin/pip install --no-index --no-deps --no-build-isolation --no-cache-dir \
        --disable-pip-version-check /tmp/cessl-src \
    && /opt/venv/bin/pip check --disable-pip-version-check \
    && rm -rf /tmp/cessl-src

ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/cessl \
    MPLCONFIGDIR=/tmp/matplotlib \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

USER ${CESSL_UID}:${CESSL_UID}
WORKDIR /home/cessl

# Kubeflow steps and the MLflow Deployment set their own command (k8s `command:`
# replaces the entrypoint); `docker run IMAGE demo` runs `cessl demo`.
ENTRYPOINT ["cessl"]
CMD ["--help"]
