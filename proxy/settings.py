"""Process settings read from the environment (the names are part of the public contract)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"environment: {name} must be an integer, got {raw!r}") from None


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"environment: {name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    """Everything a costproxy process needs from its environment.

    ``redis_url`` / ``database_url`` left empty mean "embedded servers under ``data_dir``".
    """

    redis_url: str = ""
    database_url: str = ""
    data_dir: Path = Path(".data")
    pricing_file: Path = Path("pricing.yaml")
    tiers_file: Path = Path("tiers.yaml")
    admin_token: str = ""
    redis_prefix: str = "cp:"
    provider_keys: dict[str, str] = field(default_factory=dict)
    upstream_urls: dict[str, str] = field(default_factory=dict)
    max_body_bytes: int = 16 * 1024 * 1024
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 300.0
    hold_ttl_seconds: int = 900
    drain_seconds: float = 30.0
    key_cache_seconds: float = 5.0
    config_reload_seconds: float = 2.0
    worker_batch: int = 500
    stripe_api_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""
    checkout_success_url: str = "http://localhost:8080/api/credits"
    checkout_cancel_url: str = "http://localhost:8080/api/credits"
    past_due_grace_days: float = 7.0
    smtp_url: str = ""
    mail_from: str = "costproxy@localhost"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        """Build settings from ``os.environ`` (or the mapping given)."""
        env = dict(os.environ if env is None else env)
        keys = {
            name[: -len("_API_KEY")].lower(): value
            for name, value in env.items()
            if name.endswith("_API_KEY") and value
        }
        if "gemini" in keys:
            keys.setdefault("google", keys["gemini"])
        upstreams = {
            name[: -len("_UPSTREAM_URL")].lower(): value.rstrip("/")
            for name, value in env.items()
            if name.endswith("_UPSTREAM_URL") and value
        }
        return cls(
            redis_url=env.get("REDIS_URL", ""),
            database_url=env.get("DATABASE_URL", ""),
            data_dir=Path(env.get("DATA_DIR") or ".data"),
            pricing_file=Path(env.get("PRICING_FILE") or "pricing.yaml"),
            tiers_file=Path(env.get("TIERS_FILE") or "tiers.yaml"),
            admin_token=env.get("ADMIN_TOKEN", ""),
            redis_prefix=env.get("REDIS_PREFIX") or "cp:",
            provider_keys=keys,
            upstream_urls=upstreams,
            max_body_bytes=_int(env, "MAX_BODY_BYTES", cls.max_body_bytes),
            upstream_connect_timeout=_float(env, "UPSTREAM_CONNECT_TIMEOUT", cls.upstream_connect_timeout),
            upstream_read_timeout=_float(env, "UPSTREAM_READ_TIMEOUT", cls.upstream_read_timeout),
            hold_ttl_seconds=_int(env, "HOLD_TTL_SECONDS", cls.hold_ttl_seconds),
            drain_seconds=_float(env, "DRAIN_SECONDS", cls.drain_seconds),
            key_cache_seconds=_float(env, "KEY_CACHE_SECONDS", cls.key_cache_seconds),
            config_reload_seconds=_float(env, "CONFIG_RELOAD_SECONDS", cls.config_reload_seconds),
            worker_batch=_int(env, "WORKER_BATCH", cls.worker_batch),
            stripe_api_key=env.get("STRIPE_API_KEY", ""),
            stripe_webhook_secret=env.get("STRIPE_WEBHOOK_SECRET", ""),
            stripe_api_base=env.get("STRIPE_API_BASE", ""),
            checkout_success_url=env.get("CHECKOUT_SUCCESS_URL") or cls.checkout_success_url,
            checkout_cancel_url=env.get("CHECKOUT_CANCEL_URL") or cls.checkout_cancel_url,
            past_due_grace_days=_float(env, "PAST_DUE_GRACE_DAYS", cls.past_due_grace_days),
            smtp_url=env.get("SMTP_URL", ""),
            mail_from=env.get("MAIL_FROM") or cls.mail_from,
        )
