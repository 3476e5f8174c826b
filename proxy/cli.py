"""The ``costproxy`` command line: servers, migrations, config check, users, keys, credits, reconciliation."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from .settings import Settings

if TYPE_CHECKING:
    from decimal import Decimal

    import asyncpg

    from .reconcile.report import Reconciliation
    from .server import ServeLimits

T = TypeVar("T")
#: a subcommand: parsed arguments and settings in, exit status out
Command = Callable[[argparse.Namespace, Settings], int]


def _print(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(data, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v), indent=2))
    else:
        print(text)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(coro)


# servers ----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from . import supervisor  # imports nothing of prometheus_client, which must not be loaded before this

    metrics = supervisor.prepare_metrics() if args.workers > 1 else None
    from .config import ConfigError, load_config

    try:
        load_config(settings.pricing_file, settings.tiers_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if metrics is not None:
        return supervisor.run_workers(args.workers, lambda: _serve_proxy(args, settings, reuse_port=True), metrics)
    return _serve_proxy(args, settings, reuse_port=False)


def _serve_proxy(args: argparse.Namespace, settings: Settings, *, reuse_port: bool) -> int:
    from .app import create_app
    from .runtime import database_url, redis_url
    from .server import serve
    from .state import CONFIG

    app = create_app(settings, redis_url(settings), database_url(settings))
    _run(
        serve(
            app,
            host=args.host,
            port=args.port,
            limits=_limits(settings),
            reuse_port=reuse_port,
            reload=lambda: app[CONFIG].reload(),
        )
    )
    return 0


def _limits(settings: Settings) -> ServeLimits:
    from .server import ServeLimits

    return ServeLimits(
        header_timeout=settings.header_timeout,
        max_connections=settings.max_connections,
        stop_grace=settings.stop_grace_seconds,
        drain_timeout=settings.drain_seconds + 30,
    )


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    from .billing.webhooks import CONFIG as WEBHOOK_CONFIG
    from .billing.webhooks import create_webhook_app
    from .runtime import database_url, redis_url
    from .server import serve

    if not settings.stripe_webhook_secret:
        logging.getLogger("costproxy").warning("STRIPE_WEBHOOK_SECRET is not set: every event will be refused")
    app = create_webhook_app(settings, redis_url(settings), database_url(settings))
    _run(serve(app, host=args.host, port=args.port, limits=_limits(settings), reload=lambda: app[WEBHOOK_CONFIG].reload()))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from .runtime import database_url, redis_url
    from .worker import run_worker

    try:
        _run(run_worker(settings, redis_url(settings), database_url(settings), args.port))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from .db import migrate
    from .runtime import database_url

    applied = _run(migrate(database_url(settings)))
    print(f"applied {', '.join(applied)}" if applied else "database is up to date")
    return 0


def cmd_config_check(args: argparse.Namespace, settings: Settings) -> int:
    from .config import ConfigError, load_config

    try:
        config = load_config(settings.pricing_file, settings.tiers_file)
    except ConfigError as exc:
        print(f"{len(exc.problems)} problem(s):", file=sys.stderr)
        print(exc, file=sys.stderr)
        return 1
    models = sum(len(p.models) for p in config.prices.providers.values())
    print(
        f"ok: {settings.pricing_file} ({len(config.prices.providers)} providers, {models} models), "
        f"{settings.tiers_file} ({len(config.tiers.tiers)} tiers)"
    )
    return 0


def cmd_config_versions(args: argparse.Namespace, settings: Settings) -> int:
    """Every price version the gateway has loaded, newest first; ``in_file`` marks the
    version of the pricing file as it is now on disk."""
    from .db import connect_pool
    from .price_versions import list_versions
    from .pricing import price_version
    from .runtime import database_url

    async def main() -> int:
        pool = await connect_pool(database_url(settings))
        try:
            versions = await list_versions(pool)
        finally:
            await pool.close()
        on_disk = price_version(settings.pricing_file.read_bytes())
        rows = [{**v.as_json(), "in_file": v.version == on_disk} for v in versions]
        lines = [
            f"{v.version}  first {v.first_loaded_at:%Y-%m-%d %H:%M:%S}  last {v.last_loaded_at:%Y-%m-%d %H:%M:%S}  "
            f"{v.models} models" + ("  (last loaded)" if v.current else "") + ("  (pricing file)" if v.version == on_disk else "")
            for v in versions
        ]
        if on_disk not in {v.version for v in versions}:
            lines.append(f"{on_disk}  the pricing file as it is now: no process has loaded it yet")
        _print(rows, args.json, "\n".join(lines) or "no price version stored yet")
        return 0

    return _run(main())


# account commands -------------------------------------------------------------------------
def _with_accounts(action: Callable[[Any, argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace, Settings], int]:
    """Run ``action(accounts, args)`` with a connected account service."""

    def command(args: argparse.Namespace, settings: Settings) -> int:
        async def main() -> int:
            from .accounts import AccountError, Accounts
            from .config import load_config
            from .db import connect_pool
            from .keys import KeyMirror
            from .ledger import Ledger
            from .redis_url import parse_redis_url
            from .redis_url import redis_client as connect_redis
            from .runtime import database_url, redis_url

            redis = connect_redis(parse_redis_url(redis_url(settings)))
            pool = await connect_pool(database_url(settings))
            try:
                accounts = Accounts(
                    pool,
                    Ledger(redis, settings.redis_prefix),
                    KeyMirror(redis, settings.redis_prefix),
                    load_config(settings.pricing_file, settings.tiers_file),
                )
                return await action(accounts, args)
            except AccountError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            finally:
                await pool.close()
                await redis.aclose()

        return _run(main())

    return command


@_with_accounts
async def cmd_users_create(accounts: Any, args: argparse.Namespace) -> int:
    user_id, key = await accounts.create_user(args.email, args.tier)
    _print(
        {"user_id": user_id, "key_id": key.key_id, "api_key": key.api_key},
        args.json,
        f"user_id: {user_id}\nkey_id:  {key.key_id}\napi_key: {key.api_key}\n(the key is shown only once)",
    )
    return 0


@_with_accounts
async def cmd_keys_create(accounts: Any, args: argparse.Namespace) -> int:
    key = await accounts.create_key(args.user, args.name)
    _print(
        {"key_id": key.key_id, "api_key": key.api_key},
        args.json,
        f"key_id:  {key.key_id}\napi_key: {key.api_key}\n(the key is shown only once)",
    )
    return 0


@_with_accounts
async def cmd_keys_list(accounts: Any, args: argparse.Namespace) -> int:
    keys = await accounts.list_keys(args.user)
    lines = [
        f"{k['id']}  {k['user_id']}  {k['key_prefix']}…  {k['name'] or '-'}  "
        f"{'revoked ' + k['revoked_at'].isoformat() if k['revoked_at'] else 'active'}"
        for k in keys
    ]
    _print(keys, args.json, "\n".join(lines) or "no keys")
    return 0


@_with_accounts
async def cmd_keys_revoke(accounts: Any, args: argparse.Namespace) -> int:
    await accounts.revoke_key(args.key_id)
    _print({"key_id": args.key_id, "revoked": True}, args.json, f"revoked {args.key_id}")
    return 0


@_with_accounts
async def cmd_credits_grant(accounts: Any, args: argparse.Namespace) -> int:
    from .money import credits

    balance = await accounts.grant(args.user, args.credits, args.reason)
    _print(
        {"user": args.user, "granted_credits": args.credits, "balance_micro_usd": balance},
        args.json,
        f"granted {args.credits} credits; balance {credits(balance)} credits",
    )
    return 0


@_with_accounts
async def cmd_credits_show(accounts: Any, args: argparse.Namespace) -> int:
    from .money import credits

    shown = await accounts.show(args.user, args.limit)
    account, total = shown.account, shown.ledger_sum_micro
    redis_line = (
        f"redis balance {credits(account.balance)} credits ({account.balance} µ$), held {account.held} µ$"
        if account
        else "redis         no account (lost with Redis's data? see `costproxy ledger rebuild`)"
    )
    lines = [
        f"user {shown.user['id']} <{shown.user['email']}>  tier {account.tier if account else shown.user['tier']}",
        redis_line,
        f"ledger sum    {credits(total)} credits ({total} µ$)"
        + ("" if account is None or total == account.balance else "  (usage log still catching up)"),
        "",
        *(
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {r['kind']:<7} {r['amount_micro']:>14} µ$"
            f"  balance {r['balance_micro']:>14} µ$  {r['reason'] or ''}"
            for r in shown.ledger
        ),
    ]
    _print(shown.as_json(), args.json, "\n".join(lines))
    return 0


@_with_accounts
async def cmd_ledger_check(accounts: Any, args: argparse.Namespace) -> int:
    from .recovery import check

    report = await check(accounts.ledger, accounts.pool, user=args.user, wait=args.wait)
    lines = [d.line() for d in report.differences]
    summary = (
        f"ledger check: {report.accounts} accounts, {report.unwritten_events} events not yet in Postgres, "
        f"{len(report.differences)} differences" + ("" if report.differences else ": Redis and Postgres agree to the µ$")
    )
    _print(report.as_json(), args.json, "\n".join([summary, *lines]))
    return 0 if report.clean else 1


@_with_accounts
async def cmd_ledger_rebuild(accounts: Any, args: argparse.Namespace) -> int:
    from .money import credits
    from .recovery import RebuildRefusedError, rebuild

    try:
        report = await rebuild(
            accounts.ledger, accounts.pool, accounts.mirror, accounts.config.tiers, user=args.user, force=args.force
        )
    except RebuildRefusedError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    text = (
        f"restored {len(report.restored)} accounts from the Postgres ledger ({credits(report.balance)} credits in all), "
        f"kept {len(report.kept)} that Redis still has"
        + (" (--force replaces them)" if report.kept else "")
        + f", mirrored {report.keys} active keys"
    )
    _print(report.as_json(), args.json, text)
    return 0


# reconciliation ---------------------------------------------------------------------------
def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0: within the tolerance; 1: a difference beyond it; 2: nothing could be compared
    (one line on stderr). What was compared is stored (``reconcile_runs``, run by ``cli``)."""
    from decimal import Decimal
    from functools import partial

    from .config import ConfigError, load_config
    from .reconcile.access import ReportProvider, report_access
    from .reconcile.pages import ReportError
    from .reconcile.providers import reconcile_provider
    from .reports.periods import QueryError, between

    try:
        between(args.start, args.end)  # in order, and at most MAX_DAYS
    except QueryError as exc:
        return _not_compared(f"--from {args.start} --to {args.end}: {exc}")
    if args.source == "stripe":
        from stripe import StripeError

        from .reconcile.stripe import reconcile_stripe

        if not settings.stripe_api_key:
            return _not_compared("STRIPE_API_KEY is not set")
        # any Stripe difference counts: tolerance 0
        return _run(_reconcile(args, settings, partial(reconcile_stripe, settings), Decimal(0), StripeError))
    provider = ReportProvider(args.source)
    try:
        prices = load_config(settings.pricing_file, settings.tiers_file).prices
    except ConfigError as exc:
        more = len(exc.problems) - 1
        return _not_compared(exc.problems[0] + (f" (and {more} more: see costproxy config check)" if more > 0 else ""))
    access = report_access(settings, prices, provider)
    if access is None:
        return _not_compared(f"{provider.admin_key_name} is not set: the provider's reports need an admin key")
    return _run(_reconcile(args, settings, partial(reconcile_provider, access), settings.reconcile_tolerance, ReportError))


def _not_compared(message: str) -> int:
    """Exit status 2 with ``message`` as one line on stderr."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _postgres(exc: BaseException) -> str:
    """A Postgres error as a message that says it is Postgres's (``connect_pool`` already does)."""
    text = str(exc) or type(exc).__name__
    return text if text.startswith("cannot connect to PostgreSQL") else f"PostgreSQL: {text}"


async def _reconcile(
    args: argparse.Namespace,
    settings: Settings,
    reconcile: Callable[[asyncpg.Pool, date, date], Awaitable[Reconciliation]],
    tolerance: Decimal,
    unreadable: type[Exception],
) -> int:
    """Run ``reconcile(pool, start, end)``, print its report and store it; ``unreadable``: the
    error of a source that could not be read. That, or Postgres unreachable or failing: exit 2."""
    from asyncpg import InterfaceError, PostgresError

    from .db import connect_pool
    from .reconcile.store import RanBy, store
    from .runtime import database_url

    postgres_errors = (OSError, PostgresError, InterfaceError)
    try:
        pool = await connect_pool(database_url(settings))
    except postgres_errors as exc:
        return _not_compared(_postgres(exc))
    try:
        try:
            result = await reconcile(pool, args.start, args.end)
        except unreadable as exc:
            return _not_compared(str(exc))
        except postgres_errors as exc:
            return _not_compared(_postgres(exc))
        exceeds = result.exceeds(tolerance)
        _print({**result.to_json(), "tolerance": str(tolerance), "exceeds": exceeds}, args.json, result.render())
        try:
            await store(pool, result, tolerance, RanBy.CLI)
        except postgres_errors as exc:  # compared and shown: the exit status still says what was found
            print(f"warning: the result is not stored: {' '.join(_postgres(exc).split())}", file=sys.stderr)
    finally:
        await pool.close()
    return 1 if exceeds else 0


def _day(text: str) -> date:
    from .reports.periods import QueryError, parse_day

    try:
        return parse_day(text, "the day")
    except QueryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costproxy", description="Metered gateway for LLM provider APIs.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT); one per core")
    serve.set_defaults(func=cmd_serve)

    webhooks = sub.add_parser("webhooks", help="run the Stripe webhook listener (POST /stripe/webhook)")
    webhooks.add_argument("--host", default="0.0.0.0")
    webhooks.add_argument("--port", type=int, default=8090)
    webhooks.set_defaults(func=cmd_webhooks)

    worker = sub.add_parser("worker", help="run the worker (usage log, hold expiry)")
    worker.add_argument("--port", type=int, default=9101, help="port for /healthz and /metrics")
    worker.set_defaults(func=cmd_worker)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    config = sub.add_parser("config", help="configuration files").add_subparsers(dest="action", required=True)
    config.add_parser("check", help="validate pricing.yaml and tiers.yaml").set_defaults(func=cmd_config_check)
    versions = config.add_parser("versions", help="the price versions (pricing.yaml contents) the gateway has loaded")
    versions.add_argument("--json", action="store_true")
    versions.set_defaults(func=cmd_config_versions)

    users = sub.add_parser("users", help="users").add_subparsers(dest="action", required=True)
    create = users.add_parser("create", help="create a user with a first key")
    create.add_argument("--email", required=True)
    create.add_argument("--tier", required=True)
    create.set_defaults(func=cmd_users_create)

    keys = sub.add_parser("keys", help="proxy keys").add_subparsers(dest="action", required=True)
    kc = keys.add_parser("create", help="issue another key to a user")
    kc.add_argument("--user", required=True, help="user id or email")
    kc.add_argument("--name", default="")
    kc.set_defaults(func=cmd_keys_create)
    kl = keys.add_parser("list", help="list keys")
    kl.add_argument("--user", help="user id or email")
    kl.set_defaults(func=cmd_keys_list)
    kr = keys.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id")
    kr.set_defaults(func=cmd_keys_revoke)

    credits = sub.add_parser("credits", help="balances and grants").add_subparsers(dest="action", required=True)
    cs = credits.add_parser("show", help="Redis balance next to the Postgres ledger")
    cs.add_argument("user", help="user id or email")
    cs.add_argument("--limit", type=int, default=20, help="ledger rows to print")
    cs.set_defaults(func=cmd_credits_show)
    cg = credits.add_parser("grant", help="grant (or with a negative number remove) credits")
    cg.add_argument("user", help="user id or email")
    cg.add_argument("--credits", type=int, required=True, help="1 credit = $0.01")
    cg.add_argument("--reason", default="operator grant")
    cg.set_defaults(func=cmd_credits_grant)
    ledger = sub.add_parser("ledger", help="Redis against the Postgres ledger").add_subparsers(dest="action", required=True)
    lc = ledger.add_parser("check", help="every balance, hold and counter in Redis against the ledger (exit 1 on a difference)")
    lc.add_argument("--user", help="user id or email (default: every account)")
    lc.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the worker to write pending events")
    lc.set_defaults(func=cmd_ledger_check)
    lr = ledger.add_parser("rebuild", help="restore accounts and the key mirror in Redis from Postgres")
    lr.add_argument("--user", help="user id or email (default: every account)")
    lr.add_argument("--force", action="store_true", help="replace accounts Redis still has; drop events not yet in Postgres")
    lr.set_defaults(func=cmd_ledger_rebuild)
    reconcile = sub.add_parser(
        "reconcile", help="the usage log against a provider's own reports, or revenue against Stripe (exit 1 beyond tolerance)"
    )
    reconcile.add_argument("source", choices=["openai", "anthropic", "stripe"], help="whose records to compare with ours")
    reconcile.add_argument("--from", dest="start", type=_day, required=True, metavar="YYYY-MM-DD", help="first UTC day")
    reconcile.add_argument("--to", dest="end", type=_day, required=True, metavar="YYYY-MM-DD", help="last UTC day (inclusive)")
    reconcile.set_defaults(func=cmd_reconcile)
    for account_command in (create, kc, kl, kr, cs, cg, lc, lr, reconcile):  # last, as it is in their help
        account_command.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``costproxy`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # chatty about attaching to the embedded server
    args = build_parser().parse_args(argv)
    command: Command = args.func
    try:
        return command(args, Settings.from_env())
    except _expected_errors() as exc:
        from redis.exceptions import RedisError

        where = "Redis: " if isinstance(exc, RedisError) else ""  # its errors name only host and port
        print(f"error: {where}{str(exc) or type(exc).__name__}", file=sys.stderr)
        return 1


def _expected_errors() -> tuple[type[Exception], ...]:
    """A bad setting, Redis or Postgres unreachable or failing: one line, not a traceback
    (their modules imported only once a command failed)."""
    from asyncpg import InterfaceError, PostgresError
    from redis.exceptions import RedisError

    return ValueError, OSError, RedisError, PostgresError, InterfaceError


if __name__ == "__main__":
    sys.exit(main())
