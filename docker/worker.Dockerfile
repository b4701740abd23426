# syntax=docker/dockerfile:1
# A worker (DESIGN.md §1): torch and the model code — `scripts/install.sh worker-cuda|worker-cpu`, which installs
# `.[worker]` with service/ and model_store/, every version from the locks (CI runs the same script natively).
# No weights inside: they live on a volume mounted at /models (SAFFRON_HOME), built once by the image's own
# `python -m model_store prepare` (docker-compose*.yml: the one-shot `prepare` service; Kubernetes: an initContainer).
#
#   CUDA (default): docker build -f docker/worker.Dockerfile -t saffron-guard/worker:0.1.0-cuda .
#                   NVIDIA CUDA 13.0 runtime base, PyPI's CUDA 13.0 build of torch (docker/requirements-cuda.lock)
#   CPU:            docker build -f docker/worker.Dockerfile --build-arg VARIANT=cpu -t saffron-guard/worker:0.1.0-cpu .
#
#   docker run --rm -v saffron-models:/models saffron-guard/worker:0.1.0-cpu python -m model_store prepare
#   docker run --rm -v saffron-models:/models:ro -e SAFFRON_REDIS_URL=... --gpus device=0 saffron-guard/worker:0.1.0-cuda
ARG VARIANT=cuda

FROM python:3.11-slim-bookworm AS python-cpu
ENV PYTHON=python3.11

# The base's CUDA version is the one torch was built with (tests/deploy/test_images_and_compose.py checks it), so the
# NVIDIA Container Toolkit refuses, with a clear message, a host whose driver is too old for it.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS python-cuda
ENV PYTHON=python3.12
# Ubuntu 24.04's Python 3.12 (the project needs >= 3.11); the tag above fixes the release, `3.12.*` the series.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12=3.12.* python3.12-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/*

# The stage above that VARIANT names (hadolint takes `python-${VARIANT}` for an untagged image: DL3006 does not apply).
# hadolint ignore=DL3006
FROM python-${VARIANT} AS python

FROM python AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (torch and the CUDA wheels are gigabytes): rebuilt only when the pins or requirements change.
COPY requirements.lock pyproject.toml README.md ./
COPY docker/requirements-cuda.lock docker/
COPY scripts/install.sh scripts/
RUN scripts/install.sh "worker-${VARIANT}" /opt/venv --deps-only
COPY service service
COPY model_store model_store
RUN scripts/install.sh "worker-${VARIANT}" /opt/venv

FROM python
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SAFFRON_HOME=/models \
    HOME=/home/saffron
# /models belongs to the service user, so a new named volume mounted there is writable by `prepare`.
RUN groupadd --system --gid 10001 saffron \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/saffron --shell /usr/sbin/nologin saffron \
    && mkdir /models \
    && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
COPY scripts/healthcheck.py /opt/saffron-guard/healthcheck.py
USER 10001:10001
# A worker's /metrics and /healthz (SAFFRON_WORKER_METRICS_PORT).
EXPOSE 9101
# /healthz: 200 while the main loop goes round (503 before the models are loaded, hence the long start period).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/saffron-guard/healthcheck.py", "worker"]
# On SIGTERM a worker stops taking jobs, finishes its searches for SAFFRON_WORKER_SHUTDOWN_GRACE_S (30 s), then hands
# back the rest: stop it with a longer timeout (docker-compose*.yml: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["saffron-guard"]
CMD ["worker"]
