# syntax=docker/dockerfile:1
# One Egret image for all five deployables, the four services and the portal: each runs from it
# with its own entry point, `python -m services.<name>` (the Helm chart sets the command per
# Deployment). They share kit/, the generated stubs and every dependency, so one image means one
# build, one vulnerability scan, one tag to promote, and the deployables of one release can never
# disagree about the protobuf contracts between them.
#
#   docker build -t egret:0.1.0 .
#   docker run --rm egret:0.1.0 python -m services.score --help
#   docker run --rm egret:0.1.0 python -m services.portal --help
#
# Without a container engine (the development and CI machines): `make image` builds this file with
# buildah on a debootstrap base, `make image-check` checks the result (deploy/image/build.sh,
# docs/deploy.md "The image").

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: generate the gRPC stubs and build Egret into a virtual environment -----------
FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# durable-rules is published only as a source distribution with a C extension: the build
# stage compiles it (Python's headers come with the python image; a Debian base needs
# python3-dev). Nothing of this reaches the runtime stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && include="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && { [ -f "$include/Python.h" ] \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-dev; } \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# An index other than PyPI's, its credentials or its CA come in as the optional build secret
# `pip.conf` (a pip configuration file; deploy/image/build.sh passes this machine's), never as a
# build argument or a file of the image: secrets are mounted for one RUN and leave no layer.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
 && python -m venv /opt/egret \
 && python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install --no-cache-dir 'grpcio-tools==1.85.1'
COPY protos/ protos/
# Stubs are generated here, never copied from a developer's gen/ (see .dockerignore).
RUN mkdir -p gen \
 && find protos -name '*.proto' -print0 | xargs -0 /opt/protoc/bin/python -m grpc_tools.protoc -Iprotos \
      --python_out=gen --pyi_out=gen --grpc_python_out=gen \
 && find gen/egret -type d -exec touch {}/__init__.py \; \
 && touch gen/egret/py.typed
COPY pyproject.toml ./
COPY kit/ kit/
COPY domain/ domain/
COPY contracts/ contracts/
COPY services/ services/
COPY devtools/ devtools/
COPY bench/ bench/
# The portal's message catalogues are compiled (.po → .mo) into the installed package by the
# portal's own command (Babel, as pybabel compile), so it loads them instead of compiling them in
# memory at every start (services/portal/i18n.py). -P: the installed package, not ./services.
# pip then leaves the virtual environment: nothing installs into a running image.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
 && /opt/egret/bin/pip install --no-cache-dir . \
 && /opt/egret/bin/python -P -m services.portal compile-translations \
 && /opt/egret/bin/python -m pip uninstall --yes --quiet pip \
 && /opt/egret/bin/python -m compileall -q /opt/egret/lib

# --- runtime: the virtual environment and the default config, nothing else ----------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="egret" \
      org.opencontainers.image.description="Egret civic credit-points engine: ingest, rules, score, query and the portal" \
      org.opencontainers.image.source="https://example.org/egret"
# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
# No package manager either: apt's and dpkg's programs, pip (the base image's, its module and
# ensurepip's bundled wheels) go, so nothing can be installed into a running container. dpkg's
# database stays: image scanners read it to list the operating system's packages.
RUN groupadd --system --gid 10001 egret \
 && useradd --system --uid 10001 --gid egret --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin egret \
 && rm -rf /usr/bin/apt /usr/bin/apt-* /usr/bin/dpkg /usr/bin/dpkg-* /usr/lib/apt /etc/apt \
      /usr/local/bin/pip* /usr/bin/pip* /usr/local/lib/python3*/site-packages/pip \
      /usr/lib/python3/dist-packages/pip /usr/local/lib/python3*/ensurepip /usr/lib/python3*/ensurepip \
      /usr/share/python-wheels /root/.cache
COPY --from=build /opt/egret /opt/egret
WORKDIR /app
# The sample configuration: the defaults of EGRET_*_FILE (relative to /app). Deployments
# mount their own from ConfigMaps; migration Jobs use these to pass the settings check.
COPY config/ config/
# Two malloc arenas instead of eight per core: the gRPC, database and engine threads otherwise
# each keep freed heap in an arena of their own (a flood of 1 MiB queries peaked at 515 MiB
# RSS with the default, 397 MiB with two; docs/deploy.md, "Memory").
# matplotlib (the portal's charts) keeps its font list in a writable directory: the pods'
# /tmp (an emptyDir; the root filesystem is read-only), built once per pod start.
ENV PATH=/opt/egret/bin:$PATH \
    MALLOC_ARENA_MAX=2 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EGRET_DATA_DIR=/var/lib/egret
USER 10001:10001
EXPOSE 50051 50052 50053 50054 8080
# No HEALTHCHECK: the chart's exec probes run `python -c` with grpcio-health-checking from this
# image against grpc.health.v1 over TLS, with the pod's mounted CA and certificate (deploy/k8s);
# the portal's are the kubelet's HTTP probes of its /healthz.
CMD ["python", "-m", "services.ingest"]
