# The chat service: gunicorn with uvicorn workers on :8000. Build args name the base image, so the same
# file builds from the official Python image or from a local stand-in (docker/local-base-images.env).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.8
# uv trusts the system store, which is where a stand-in image keeps the host's CA bundle.
ENV UV_NATIVE_TLS=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --quiet "uv==${UV_VERSION}"
WORKDIR /src
COPY pyproject.toml uv.lock ./
# The layer is installed as the package it is published as (layer/pyproject.toml), not from a path.
COPY layer/ ./layer/
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-install-project --no-editable --no-cache --python python3
COPY services/ /app/services/
RUN python3 -m compileall -q /app/services

# Locust with the project's scenarios: `docker build --target loadtest` (the compose `loadtest` profile).
FROM build AS loadtest-build
ENV UV_PROJECT_ENVIRONMENT=/opt/loadtest
RUN /opt/uv/bin/uv sync --frozen --only-group loadtest --no-install-project --no-cache --python python3

FROM ${PYTHON_IMAGE} AS loadtest
COPY --from=loadtest-build /opt/loadtest /opt/loadtest
COPY loadtest/ /app/loadtest/
ENV PATH=/opt/loadtest/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001:10001
EXPOSE 8089 5557
ENTRYPOINT ["locust", "--locustfile", "loadtest/locustfile.py"]

FROM ${PYTHON_IMAGE} AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# /tmp is the only writable path: gunicorn's heartbeat files and the Prometheus multiprocess files.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/services \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=chatsite.settings \
    BIND=0.0.0.0:8000 \
    OPS_BIND=0.0.0.0:9000 \
    WEB_CONCURRENCY=2 \
    GRACEFUL_TIMEOUT=25
WORKDIR /app
USER 10001:10001
# 8000 is public; 9000 serves /healthz, /readyz and /metrics to probes and Prometheus only.
EXPOSE 8000 9000
HEALTHCHECK --interval=10s --timeout=4s --start-period=30s --retries=3 CMD ["python", "-m", "chatsite.probe", "/healthz"]
ENTRYPOINT ["gunicorn", "--config", "python:chatsite.gunicorn_conf", "chatsite.asgi:application"]
