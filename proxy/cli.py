"""The ``costproxy`` command line: servers, migrations, config check, users, keys, credits."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from .settings import Settings


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


def _run(coro: Awaitable[Any]) -> Any:
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


# servers ----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from .app import create_app
    from .config import ConfigError, load_config
    from .runtime import database_url, redis_url

    try:
        load_config(settings.pricing_file, settings.tiers_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    app = create_app(settings, redis_url(settings), database_url(settings))
    logging.getLogger("costproxy").info("proxy listening on %s:%d", args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=_new_loop())
    return 0


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from .billing.webhooks import create_webhook_app
    from .runtime import database_url, redis_url

    if not settings.stripe_webhook_secret:
        logging.getLogger("costproxy").warning("STRIPE_WEBHOOK_SECRET is not set: every event will be refused")
    app = create_webhook_app(settings, redis_url(settings), database_url(settings))
    logging.getLogger("costproxy").info("webhook listener on %s:%d", args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=_new_loop())
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


# account commands -------------------------------------------------------------------------
def _with_accounts(action: Callable[[Any, argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace, Settings], int]:
    """Run ``action(accounts, args)`` with a connected account service."""

    def command(args: argparse.Namespace, settings: Settings) -> int:
        async def main() -> int:
            from redis.asyncio import Redis

            from .accounts import AccountError, Accounts
            from .config import load_config
            from .db import connect_pool
            from .keys import KeyMirror
            from .ledger import Ledger
            from .runtime import database_url, redis_url

            redis = Redis.from_url(redis_url(settings))
            pool = await connect_pool(database_url(settings))
            try:
                accounts = Accounts(
                    pool, Ledger(redis, settings.redis_prefix), KeyMirror(redis, settings.redis_prefix),
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
        {"user_id": user_id, "key_id": key.key_id, "api_key": key.api_key}, args.json,
        f"user_id: {user_id}\nkey_id:  {key.key_id}\napi_key: {key.api_key}\n(the key is shown only once)",
    )
    return 0


@_with_accounts
async def cmd_keys_create(accounts: Any, args: argparse.Namespace) -> int:
    key = await accounts.create_key(args.user, args.name)
    _print({"key_id": key.key_id, "api_key": key.api_key}, args.json,
           f"key_id:  {key.key_id}\napi_key: {key.api_key}\n(the key is shown only once)")
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
    from .gate import credits

    balance = await accounts.grant(args.user, args.credits, args.reason)
    _print({"user": args.user, "granted_credits": args.credits, "balance_micro_usd": balance}, args.json,
           f"granted {args.credits} credits; balance {credits(balance)} credits")
    return 0


@_with_accounts
async def cmd_credits_show(accounts: Any, args: argparse.Namespace) -> int:
    from .gate import credits

    shown = await accounts.show(args.user, args.limit)
    account = shown["account"] or {}
    balance = int(account.get("balance", 0))
    lines = [
        f"user {shown['user']['id']} <{shown['user']['email']}>  tier {account.get('tier')}",
        f"redis balance {credits(balance)} credits ({balance} µ$), held {int(account.get('held', 0))} µ$",
        f"ledger sum    {credits(shown['ledger_sum_micro'])} credits ({shown['ledger_sum_micro']} µ$)"
        + ("" if shown["ledger_sum_micro"] == balance else "  (usage log still catching up)"),
        "",
        *(
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {r['kind']:<7} {r['amount_micro']:>14} µ$  balance {r['balance_micro']:>14} µ$  {r['reason'] or ''}"
            for r in shown["ledger"]
        ),
    ]
    _print(shown, args.json, "\n".join(lines))
    return 0


# parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costproxy", description="Metered gateway for LLM provider APIs.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
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

    users = sub.add_parser("users", help="users").add_subparsers(dest="action", required=True)
    create = users.add_parser("create", help="create a user with a first key")
    create.add_argument("--email", required=True)
    create.add_argument("--tier", required=True)
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_users_create)

    keys = sub.add_parser("keys", help="proxy keys").add_subparsers(dest="action", required=True)
    kc = keys.add_parser("create", help="issue another key to a user")
    kc.add_argument("--user", required=True, help="user id or email")
    kc.add_argument("--name", default="")
    kc.add_argument("--json", action="store_true")
    kc.set_defaults(func=cmd_keys_create)
    kl = keys.add_parser("list", help="list keys")
    kl.add_argument("--user", help="user id or email")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=cmd_keys_list)
    kr = keys.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id")
    kr.add_argument("--json", action="store_true")
    kr.set_defaults(func=cmd_keys_revoke)

    credits = sub.add_parser("credits", help="balances and grants").add_subparsers(dest="action", required=True)
    cs = credits.add_parser("show", help="Redis balance next to the Postgres ledger")
    cs.add_argument("user", help="user id or email")
    cs.add_argument("--limit", type=int, default=20, help="ledger rows to print")
    cs.add_argument("--json", action="store_true")
    cs.set_defaults(func=cmd_credits_show)
    cg = credits.add_parser("grant", help="grant (or with a negative number remove) credits")
    cg.add_argument("user", help="user id or email")
    cg.add_argument("--credits", type=int, required=True, help="1 credit = $0.01")
    cg.add_argument("--reason", default="operator grant")
    cg.add_argument("--json", action="store_true")
    cg.set_defaults(func=cmd_credits_grant)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``costproxy`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # chatty about attaching to the embedded server
    args = build_parser().parse_args(argv)
    return args.func(args, Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
