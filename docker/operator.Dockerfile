# syntax=docker/dockerfile:1
# The operator's image: SuperLink (which runs the ServerApp), MLflow server, data tooling.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t factoryfed-operator .
# Every command is a `factoryfed deploy ...` launcher (fl_server/launch/), the same code an
# operator runs outside containers; bundles (TLS certificate and key) are mounted read-only.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# PostgreSQL as MLflow's backend store: --build-arg EXTRA_PIP="psycopg2-binary==2.9.10"
ARG EXTRA_PIP=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLWR_HOME=/srv/factoryfed/operator/flwr

RUN python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
# The CPU wheel of the pinned torch first: PyPI's default Linux wheel pulls CUDA (gigabytes).
RUN pip install --index-url "$TORCH_INDEX_URL" \
        "torch==$(sed -n 's/^torch==//p' constraints.txt)"
COPY conf conf
COPY fl_common fl_common
COPY fl_server fl_server
COPY fl_client fl_client
COPY fl_common fl_common
COPY strategies strategies
COPY standard_models standard_models
COPY experiments experiments
# Editable like `make setup`: conf/ stays next to the packages, and /app is also the Flower
# app directory `flwr run /app factoryfed` builds from.
RUN pip install -c constraints.txt -e . \
    && if [ -n "$EXTRA_PIP" ]; then pip install $EXTRA_PIP; fi

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin factoryfed \
    && mkdir -p /srv/factoryfed/operator /srv/factoryfed/mlflow /srv/factoryfed/data \
                /srv/factoryfed/outputs \
    && chown -R factoryfed:factoryfed /srv/factoryfed
USER factoryfed
WORKDIR /srv/factoryfed

EXPOSE 9093 5000
# Default: the SuperLink with TLS and SuperNode authentication, registering the provisioned
# factories. compose.yaml overrides the command for the MLflow and data services.
CMD ["factoryfed", "deploy", "superlink", "--operator-dir", "/bundles/operator", \
     "--home", "/srv/factoryfed/operator", "--host", "0.0.0.0", "--port", "9093", \
     "--register-factories"]
