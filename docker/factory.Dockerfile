# syntax=docker/dockerfile:1
# A factory's image: its Flower SuperNode, which runs the ClientApp (DP-SGD on the factory's
# data) and keeps the factory's privacy ledger. Only what that needs is installed: no MLflow,
# no Ray, no development tools, no tests or data. Build with `make images`
# (docker/build-images.sh), which chooses the base and supplies the CPU torch wheel.
#
# Run with the factory's bundle mounted read-only at /bundle, its data file under
# /srv/factoryfed/data and a volume for its privacy ledger at /srv/factoryfed/ledger (see
# compose.yaml). The SuperNode dials out to the SuperLink; it opens no port to the outside
# (its runtime API listens on 127.0.0.1:9094 inside the container).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# An extra package index serving the CPU torch wheel, for builds without a local wheel folder.
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    OMP_NUM_THREADS=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11: the python image brings it; a plain Debian bookworm base gets Debian's.
RUN if ! command -v python3.11 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    fi \
    && python3.11 -m venv /opt/venv \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /srv/factoryfed \
               --shell /usr/sbin/nologin factoryfed

# The factory's runtime dependencies, pinned by constraints.txt. docker/.build (torch wheel,
# optional CA bundle of a proxy) is mounted for this step only and never stored in the image.
COPY constraints.txt docker/factory-requirements.txt /tmp/req/
RUN --mount=type=bind,source=docker/.build,target=/build \
    if [ -f /build/ca/ca-bundle.crt ]; then export PIP_CERT=/build/ca/ca-bundle.crt; fi \
    && pip install --find-links /build/wheels \
           ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
           -c /tmp/req/constraints.txt -r /tmp/req/factory-requirements.txt \
    && python -c "import torch; assert torch.version.cuda is None, 'CUDA build of torch'" \
    && rm -rf /tmp/req

# The project itself (its dependencies are the list above, not pyproject's, which also
# serves the operator). The sources are copied, not mounted, so that a change rebuilds this step.
COPY pyproject.toml README.md /tmp/src/
COPY fl_common /tmp/src/fl_common
COPY fl_server /tmp/src/fl_server
COPY fl_client /tmp/src/fl_client
COPY strategies /tmp/src/strategies
COPY standard_models /tmp/src/standard_models
RUN --mount=type=bind,source=docker/.build,target=/build \
    if [ -f /build/ca/ca-bundle.crt ]; then export PIP_CERT=/build/ca/ca-bundle.crt; fi \
    && pip install --no-deps /tmp/src && rm -rf /tmp/src \
    && python -c "import fl_client.client_app, fl_server.launch.flower" \
    && mkdir -p /srv/factoryfed/node /srv/factoryfed/data /srv/factoryfed/ledger \
    && chown -R factoryfed:factoryfed /srv/factoryfed

USER factoryfed
WORKDIR /srv/factoryfed
VOLUME ["/srv/factoryfed/ledger"]

# Healthy: the SuperNode was accepted by the SuperLink (its log has its node id) and its
# runtime API answers.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import pathlib, socket; assert 'SuperNode ID:' in pathlib.Path('/srv/factoryfed/node/supernode.log').read_text(); socket.create_connection(('127.0.0.1', 9094), 3).close()"]

# Pass --superlink, --data-path and --ledger-path (or rely on the bundle's values).
ENTRYPOINT ["factoryfed", "deploy", "supernode", "--bundle", "/bundle", \
            "--home", "/srv/factoryfed/node"]
CMD ["--ledger-path", "/srv/factoryfed/ledger/privacy-ledger.json"]
