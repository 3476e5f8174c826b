"""Process settings read from the environment (the names are part of the public contract)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .forwarded import Network, parse_networks


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


def _ratio(env: dict[str, str], name: str, default: Decimal) -> Decimal:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise SystemExit(f"environment: {name} must be a decimal ratio such as 0.01, got {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise SystemExit(f"environment: {name} must be a ratio of 0 or more, got {raw!r}")
    return value


def _networks(env: dict[str, str], name: str) -> tuple[Network, ...]:
    try:
        return parse_networks(env.get(name, ""))
    except ValueError as exc:
        raise SystemExit(f"environment: {name}: {exc}") from None


def _bool(env: dict[str, str], name: str, *, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"environment: {name} must be true or false, got {raw!r}")


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
    hold_ttl_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    spool_dir: Path = Path(".data/spool")
    resend_seconds: float = 15.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 0  # 0: derived from the open-file limit
    drain_seconds: float = 30.0
    stop_grace_seconds: float = 3.0
    key_cache_seconds: float = 5.0
    config_reload_seconds: float = 2.0
    worker_batch: int = 500
    worker_sweep_seconds: float = 5.0
    worker_claim_idle_seconds: float = 60.0
    ledger_check_seconds: float = 3600.0
    stripe_api_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""
    checkout_success_url: str = "http://localhost:8080/api/credits"
    checkout_cancel_url: str = "http://localhost:8080/api/credits"
    past_due_grace_days: float = 7.0
    smtp_url: str = ""
    mail_from: str = "costproxy@localhost"
    #: the subscriber portal (/portal/); on by default when mail can be sent
    portal_enabled: bool = False
    #: the public base URL sign-in links point at (e.g. https://gateway.example.com)
    portal_base_url: str = "http://localhost:8080"
    #: reverse proxies whose X-Forwarded-For names the client (the portal's rate limits)
    trusted_proxies: tuple[Network, ...] = ()
    #: admin keys for the providers' usage and cost reports (``costproxy reconcile``)
    openai_admin_key: str = ""
    anthropic_admin_key: str = ""
    #: the scope the gateway's own upstream key has in those reports ("" = the whole organization)
    openai_reconcile_project_id: str = ""
    openai_reconcile_api_key_id: str = ""
    anthropic_reconcile_workspace_id: str = ""
    anthropic_reconcile_api_key_id: str = ""
    #: a reconciliation fails when a difference exceeds this share of the provider's figure
    reconcile_tolerance: Decimal = Decimal("0.01")
    #: the worker reconciles a UTC day once this long after its end (providers finalise a day about a day later)
    reconcile_settle_hours: float = 24.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Build settings from ``os.environ`` (or the mapping given)."""
        env = dict(os.environ if env is None else env)
        keys = {name[: -len("_API_KEY")].lower(): value for name, value in env.items() if name.endswith("_API_KEY") and value}
        if "gemini" in keys:
            keys.setdefault("google", keys["gemini"])
        upstreams = {
            name[: -len("_UPSTREAM_URL")].lower(): value.rstrip("/")
            for name, value in env.items()
            if name.endswith("_UPSTREAM_URL") and value
        }
        data_dir = Path(env.get("DATA_DIR") or ".data")
        settings = cls(
            redis_url=env.get("REDIS_URL", ""),
            database_url=env.get("DATABASE_URL", ""),
            data_dir=data_dir,
            pricing_file=Path(env.get("PRICING_FILE") or "pricing.yaml"),
            tiers_file=Path(env.get("TIERS_FILE") or "tiers.yaml"),
            admin_token=env.get("ADMIN_TOKEN", ""),
            redis_prefix=env.get("REDIS_PREFIX") or "cp:",
            provider_keys=keys,
            upstream_urls=upstreams,
            max_body_bytes=_int(env, "MAX_BODY_BYTES", cls.max_body_bytes),
            upstream_connect_timeout=_float(env, "UPSTREAM_CONNECT_TIMEOUT", cls.upstream_connect_timeout),
            upstream_read_timeout=_float(env, "UPSTREAM_READ_TIMEOUT", cls.upstream_read_timeout),
            hold_ttl_seconds=_float(env, "HOLD_TTL_SECONDS", cls.hold_ttl_seconds),
            heartbeat_seconds=_float(env, "HEARTBEAT_SECONDS", cls.heartbeat_seconds),
            spool_dir=Path(env.get("SPOOL_DIR") or data_dir / "spool"),
            resend_seconds=_float(env, "RESEND_SECONDS", cls.resend_seconds),
            header_timeout=_float(env, "HEADER_TIMEOUT_SECONDS", cls.header_timeout),
            body_timeout=_float(env, "BODY_TIMEOUT_SECONDS", cls.body_timeout),
            max_connections=_int(env, "MAX_CONNECTIONS", cls.max_connections),
            drain_seconds=_float(env, "DRAIN_SECONDS", cls.drain_seconds),
            stop_grace_seconds=_float(env, "STOP_GRACE_SECONDS", cls.stop_grace_seconds),
            key_cache_seconds=_float(env, "KEY_CACHE_SECONDS", cls.key_cache_seconds),
            config_reload_seconds=_float(env, "CONFIG_RELOAD_SECONDS", cls.config_reload_seconds),
            worker_batch=_int(env, "WORKER_BATCH", cls.worker_batch),
            worker_sweep_seconds=_float(env, "WORKER_SWEEP_SECONDS", cls.worker_sweep_seconds),
            worker_claim_idle_seconds=_float(env, "WORKER_CLAIM_IDLE_SECONDS", cls.worker_claim_idle_seconds),
            ledger_check_seconds=_float(env, "LEDGER_CHECK_SECONDS", cls.ledger_check_seconds),
            stripe_api_key=env.get("STRIPE_API_KEY", ""),
            stripe_webhook_secret=env.get("STRIPE_WEBHOOK_SECRET", ""),
            stripe_api_base=env.get("STRIPE_API_BASE", ""),
            checkout_success_url=env.get("CHECKOUT_SUCCESS_URL") or cls.checkout_success_url,
            checkout_cancel_url=env.get("CHECKOUT_CANCEL_URL") or cls.checkout_cancel_url,
            past_due_grace_days=_float(env, "PAST_DUE_GRACE_DAYS", cls.past_due_grace_days),
            smtp_url=env.get("SMTP_URL", ""),
            mail_from=env.get("MAIL_FROM") or cls.mail_from,
            portal_enabled=_bool(env, "PORTAL_ENABLED", default=bool(env.get("SMTP_URL"))),
            portal_base_url=(env.get("PORTAL_BASE_URL") or cls.portal_base_url).rstrip("/"),
            trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
            openai_admin_key=env.get("OPENAI_ADMIN_KEY", ""),
            anthropic_admin_key=env.get("ANTHROPIC_ADMIN_KEY", ""),
            openai_reconcile_project_id=env.get("OPENAI_RECONCILE_PROJECT_ID", ""),
            openai_reconcile_api_key_id=env.get("OPENAI_RECONCILE_API_KEY_ID", ""),
            anthropic_reconcile_workspace_id=env.get("ANTHROPIC_RECONCILE_WORKSPACE_ID", ""),
            anthropic_reconcile_api_key_id=env.get("ANTHROPIC_RECONCILE_API_KEY_ID", ""),
            reconcile_tolerance=_ratio(env, "RECONCILE_TOLERANCE", cls.reconcile_tolerance),
            reconcile_settle_hours=_float(env, "RECONCILE_SETTLE_HOURS", cls.reconcile_settle_hours),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that cannot work together (exits with the reason)."""
        if self.heartbeat_seconds <= 0 or self.hold_ttl_seconds < 3 * self.heartbeat_seconds:
            raise SystemExit(
                f"environment: HOLD_TTL_SECONDS ({self.hold_ttl_seconds}) must be at least three HEARTBEAT_SECONDS "
                f"({self.heartbeat_seconds}), so one lost heartbeat does not expire a live request's hold"
            )
        if not 0 <= self.resend_seconds <= 60:
            raise SystemExit(
                f"environment: RESEND_SECONDS must be 0 to 60 (a hold whose admission a failover lost is "
                f"charged within a minute of its placement), got {self.resend_seconds}"
            )
        if not 0 <= self.reconcile_settle_hours < float("inf"):
            raise SystemExit(f"environment: RECONCILE_SETTLE_HOURS must be 0 or more hours, got {self.reconcile_settle_hours}")
