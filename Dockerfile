# trio-counter-worker: one replica per container. Run several against the same Redis.
#
#   docker build -t trio-counter-worker .
#   docker run --rm --env-file .env -e REDIS_HOST=host.docker.internal trio-counter-worker
#
# Settings come from the environment (see README.md); the image holds no .env and no secret.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEALTH_PORT=8080

WORKDIR /app

# Only what the package build needs (pyproject.toml names README.md as the readme).
COPY pyproject.toml README.md ./
COPY trio_counter_worker ./trio_counter_worker
RUN pip install . \
    && groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home --shell /usr/sbin/nologin worker

# Numeric, so Kubernetes' runAsNonRoot can check it without resolving names.
USER 10001:10001

EXPOSE 8080

# /healthz on HEALTH_PORT: the process is alive (standbys are healthy too).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${HEALTH_PORT:-8080}/healthz', timeout=2)" || exit 1

# SIGTERM (docker stop) hands the lease over and exits 0 within milliseconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["trio-counter-worker"]
CMD ["run"]
