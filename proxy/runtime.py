"""Where this process finds Redis and Postgres: the environment's URLs or embedded servers."""

from __future__ import annotations

from .settings import Settings


def redis_url(settings: Settings) -> str:
    """``REDIS_URL``, or the embedded Redis under ``DATA_DIR`` (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    from . import embedded

    return embedded.redis_url(settings.data_dir)


def database_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded PostgreSQL under ``DATA_DIR`` (started if needed)."""
    if settings.database_url:
        return settings.database_url
    from . import embedded

    return embedded.postgres_url(settings.data_dir)
