# syntax=docker/dockerfile:1
# The gateway (DESIGN.md §1): FastAPI + uvicorn, no torch and no model code — `scripts/install.sh gateway`, which
# installs `.[gateway]` with only service/, every version from requirements.lock (CI runs the same script natively).
#
#   docker build -f docker/gateway.Dockerfile -t saffron-guard/gateway:0.1.0 .
#   docker run --rm -p 127.0.0.1:8000:8000 -e SAFFRON_REDIS_URL=redis://:PASSWORD@HOST:6379/0 saffron-guard/gateway:0.1.0

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the pins or the declared requirements change.
COPY requirements.lock pyproject.toml README.md ./
COPY docker/requirements-cuda.lock docker/
COPY scripts/install.sh scripts/
RUN scripts/install.sh gateway /opt/venv --deps-only
COPY service service
RUN scripts/install.sh gateway /opt/venv

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 saffron \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin saffron
COPY --from=build /opt/venv /opt/venv
COPY scripts/healthcheck.py /opt/saffron-guard/healthcheck.py
USER 10001:10001
EXPOSE 8000
# /health: the process serves. Not /ready: a gateway without Redis or workers is not fixed by restarting it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/saffron-guard/healthcheck.py", "gateway"]
# On SIGTERM the gateway lets in-flight requests finish for SAFFRON_GATEWAY_SHUTDOWN_GRACE_S (30 s): stop it with a
# longer timeout (docker-compose.yml: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["saffron-guard"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
