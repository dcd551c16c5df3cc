# syntax=docker/dockerfile:1
# The operator's image: Flower SuperLink (which runs the ServerApp), MLflow tracking server
# (sqlite or PostgreSQL backend store), data tools, and the Flower app /app that
# `flwr run /app <connection>` builds. Build with `make images` (docker/build-images.sh), which
# chooses the base and supplies the CPU torch wheel.
#
# Every command is a `factoryfed ...` launcher (fl_server/launch/), the same code an operator
# runs outside containers; bundles (TLS certificate and key) are mounted read-only.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# An extra package index serving the CPU torch wheel, for builds without a local wheel folder.
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    OMP_NUM_THREADS=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLWR_HOME=/srv/factoryfed/operator/flwr

# Python 3.11: the python image brings it; a plain Debian bookworm base gets Debian's.
RUN if ! command -v python3.11 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    fi \
    && python3.11 -m venv /opt/venv \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /srv/factoryfed \
               --shell /usr/sbin/nologin factoryfed

WORKDIR /app
# Dependencies first (their layer survives source changes): the project's pinned set and
# psycopg2 for a PostgreSQL backend store. docker/.build (torch wheel, optional CA bundle of a
# proxy) is mounted for this step only and never stored in the image.
COPY pyproject.toml constraints.txt README.md ./
RUN --mount=type=bind,source=docker/.build,target=/build \
    if [ -f /build/ca/ca-bundle.crt ]; then export PIP_CERT=/build/ca/ca-bundle.crt; fi \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > /tmp/req.txt \
    && pip install --find-links /build/wheels \
           ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
           -c constraints.txt -r /tmp/req.txt \
    && rm /tmp/req.txt \
    && python -c "import torch; assert torch.version.cuda is None, 'CUDA build of torch'"

COPY conf conf
COPY fl_common fl_common
COPY fl_server fl_server
COPY fl_client fl_client
COPY strategies strategies
COPY standard_models standard_models
COPY experiments experiments
# Editable like `make setup`: conf/ stays next to the packages, and /app is the Flower app
# directory. The Flower app is built from /app by `flwr run`, so /app stays read-only.
RUN --mount=type=bind,source=docker/.build,target=/build \
    if [ -f /build/ca/ca-bundle.crt ]; then export PIP_CERT=/build/ca/ca-bundle.crt; fi \
    && pip install --no-deps -e . \
    && python -c "import fl_server.server_app, psycopg" \
    && mkdir -p /srv/factoryfed/operator /srv/factoryfed/mlflow /srv/factoryfed/data \
                /srv/factoryfed/outputs \
    && chown -R factoryfed:factoryfed /srv/factoryfed

USER factoryfed
WORKDIR /srv/factoryfed

# 9093: the SuperLink's one HTTPS port (Fleet, Control and Runtime APIs); 5000: MLflow.
EXPOSE 9093 5000
# Healthy: the SuperLink answers HTTPS /health with its CA and has registered the factories
# (<home>/ready). compose.yaml gives the MLflow and data services their own checks.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import pathlib, ssl, urllib.request; assert pathlib.Path('/srv/factoryfed/operator/ready').is_file(); urllib.request.urlopen('https://127.0.0.1:9093/health', timeout=3, context=ssl.create_default_context(cafile='/bundles/operator/ca.crt'))"]
# Default: the SuperLink with TLS and SuperNode authentication, registering the provisioned
# factories. compose.yaml overrides the command for the MLflow and data services.
CMD ["factoryfed", "deploy", "superlink", "--operator-dir", "/bundles/operator", \
     "--home", "/srv/factoryfed/operator", "--host", "0.0.0.0", "--port", "9093", \
     "--register-factories"]
