# syntax=docker/dockerfile:1
# A factory's image: its SuperNode, which runs the ClientApp (DP-SGD on the factory's data).
# Build from the repository root:  docker build -f docker/factory.Dockerfile -t factoryfed-factory .
# Run with the factory's bundle mounted read-only at /bundle, its data at /srv/factoryfed/data
# and a volume for its privacy ledger at /srv/factoryfed/ledger (see compose.yaml).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

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
RUN pip install -c constraints.txt -e .

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin factoryfed \
    && mkdir -p /srv/factoryfed/node /srv/factoryfed/data /srv/factoryfed/ledger \
    && chown -R factoryfed:factoryfed /srv/factoryfed
USER factoryfed
WORKDIR /srv/factoryfed

# The SuperNode dials out to the SuperLink; its own runtime API stays on 127.0.0.1:9094.
# Pass --data-path, --ledger-path and --superlink (or rely on the bundle's values).
ENTRYPOINT ["factoryfed", "deploy", "supernode", "--bundle", "/bundle", \
            "--home", "/srv/factoryfed/node"]
CMD ["--ledger-path", "/srv/factoryfed/ledger/privacy-ledger.json"]
