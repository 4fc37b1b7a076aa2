# The inference service: the serving set (requirements.txt, no torch), the service package and the
# default model. `make image` builds it (docs/deployment.md); a plain `docker build .` works where
# the base image and PyPI can be reached.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# `make image` downloads the wheels on the host, with the host's own pip settings, into
# .cache/image/wheels; the glob lets a plain `docker build .` go on without them and use PyPI.
# A directory's contents are copied, so the wheels land beside requirements.txt.
COPY requirements.txt .cache/image/wheel[s] /tmp/build/
RUN set -eu; \
    python3 -m venv /opt/venv; \
    if ls /tmp/build/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /tmp/build; fi; \
    /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check "$@" \
        -r /tmp/build/requirements.txt; \
    /opt/venv/bin/python -m pip check
COPY service /app/service
# Compiled once here: the root file system may be read-only at run time.
RUN /opt/venv/bin/python -m compileall -q /app/service

FROM ${BASE}
ARG BASE
LABEL org.opencontainers.image.title="onnx-classifier" \
      org.opencontainers.image.description="ONNX Runtime CPU inference service for Hugging Face text classifiers" \
      org.opencontainers.image.base.name="${BASE}"
# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN useradd --no-log-init --uid 10001 --user-group --home-dir /nonexistent \
        --shell /usr/sbin/nologin service
COPY --from=build /opt/venv /opt/venv
COPY onnx_models/minilm-l6-sentiment /app/onnx_models/minilm-l6-sentiment
COPY --from=build /app/service /app/service
WORKDIR /app
# ORT_DISABLE_TELEMETRY: onnxruntime's Linux builds otherwise start their usage telemetry, which
# keeps a device id and an event store for upload under $HOME/.cache: not for an offline service.
ENV PATH=/opt/venv/bin:$PATH \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SERVICE_HOST=0.0.0.0 \
    SERVICE_PORT=8000 \
    SERVICE_MODEL_DIR=/app/onnx_models/minilm-l6-sentiment \
    SERVICE_CACHE_DIR=/app/cache
# The default model's weights are inline in its model.onnx: its memory-mapped copy is written here, so
# a read-only root serves it mapped (docs/performance.md, Memory). Readable by the service's user.
RUN python -m service --prepare
USER 10001:10001
EXPOSE 8000
# No curl in a slim image: Python asks /health on the port the service listens on.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SERVICE_PORT', '8000'), timeout=2)"]
# The service is PID 1 (exec form): SIGTERM from `docker stop` or the kubelet reaches it; it drains
# and exits 0. It starts no child processes, so there is nothing for an init to reap.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
