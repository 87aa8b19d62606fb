# license-server container image.
#
#   docker build -t license-server .
#   docker build --build-arg EXTRAS=charts -t license-server:charts .
#
# The default image holds the daemon only (about 60 MB over python:3.11-slim). EXTRAS=charts adds
# matplotlib for `report seats --chart` (about 175 MB more).
# Settings: mount a file at /etc/license-server/config.yaml (the image has config.example.yaml there) or
# use LICENSE_SERVER_* variables. In the image, listen.host/port, state_dir and the config path are set
# by the environment below, which beats the file: change them with -e, not in the file.

FROM python:3.11-slim AS builder
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY license_server ./license_server
RUN python -m venv /opt/license-server \
    && /opt/license-server/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && /opt/license-server/bin/license-server --version

FROM python:3.11-slim
ARG UID=10001
RUN groupadd --gid "$UID" license-server \
    && useradd --no-log-init --uid "$UID" --gid "$UID" --no-create-home \
        --home-dir /var/lib/license-server --shell /usr/sbin/nologin license-server \
    && install -d -o "$UID" -g "$UID" -m 0700 /var/lib/license-server
COPY --from=builder /opt/license-server /opt/license-server
COPY config.example.yaml /etc/license-server/config.yaml
ENV PATH=/opt/license-server/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LICENSE_SERVER_CONFIG=/etc/license-server/config.yaml \
    LICENSE_SERVER_STATE_DIR=/var/lib/license-server \
    LICENSE_SERVER_LISTEN__HOST=0.0.0.0 \
    LICENSE_SERVER_LISTEN__PORT=8080
VOLUME ["/var/lib/license-server"]
USER $UID:$UID
EXPOSE 8080
# The daemon handles SIGTERM and SIGINT itself, also as PID 1: stop accepting, finish calls, exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LICENSE_SERVER_LISTEN__PORT', '8080'), timeout=4)"]
ENTRYPOINT ["license-server"]
CMD ["serve"]
