"""Two proxy processes, one truth: a tier change, an edit of tiers.yaml and a key revocation
made while both serve reach both within their documented bounds (``KEY_CACHE_SECONDS``,
``CONFIG_RELOAD_SECONDS``), and the ledger check is clean afterwards."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import yaml

from ..support.waiting import until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

KEY_CACHE_SECONDS = 2.0
CONFIG_RELOAD_SECONDS = 1.0
#: what a test machine may add to a bound: a poll interval, a loaded scheduler
SLACK = 1.5


async def test_tier_change_config_edit_and_revocation_reach_every_replica_within_their_bounds(world):
    customer = await world.customer("free")
    env = {"KEY_CACHE_SECONDS": str(KEY_CACHE_SECONDS), "CONFIG_RELOAD_SECONDS": str(CONFIG_RELOAD_SECONDS)}
    with world.worker(), world.serve("one", **env) as one, world.serve("two", **env) as two:
        async with aiohttp.ClientSession() as http:

            async def answers(base: str, model: str) -> tuple[int, str]:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
                headers = {"Authorization": f"Bearer {customer.api_key}"}
                async with http.post(f"{base}/openai/v1/chat/completions", json=body, headers=headers) as response:
                    payload = await response.json(content_type=None)
                    return response.status, "" if response.status == 200 else payload["error"]["code"]

            async def everywhere(model: str, expected: tuple[int, str], bound: float, what: str) -> float:
                """Seconds until every replica answers ``expected`` for ``model`` (fails past the bound)."""
                started = time.monotonic()

                async def all_agree() -> bool:
                    seen = await asyncio.gather(answers(one.url, model), answers(two.url, model))
                    return all(answer == expected for answer in seen)

                await until(all_agree, bound + SLACK, what)
                return time.monotonic() - started

            for replica in (one, two):  # both have the key, and the free tier, cached
                assert await answers(replica.url, "gpt-4o-mini") == (200, "")
                assert await answers(replica.url, "gpt-4o") == (403, "model_not_in_tier")

            await world.accounts.change_tier(customer.user_id, "professional", source="test")
            tier_change = await everywhere("gpt-4o", (200, ""), KEY_CACHE_SECONDS, "both replicas to see the new tier")

            tiers = yaml.safe_load(world.settings.tiers_file.read_text())
            tiers["tiers"]["professional"]["models"] = ["gpt-4o-mini*"]
            world.settings.tiers_file.write_text(yaml.safe_dump(tiers))
            config_edit = await everywhere(
                "gpt-4o", (403, "model_not_in_tier"), CONFIG_RELOAD_SECONDS, "both replicas to reload tiers.yaml"
            )

            await world.accounts.revoke_key(customer.key_id)
            revocation = await everywhere("gpt-4o-mini", (401, "invalid_api_key"), KEY_CACHE_SECONDS, "the revocation")
        report = await world.ledger_check()
    assert report["clean"]
    print(
        f"two replicas: tier change seen by both after {tier_change:.2f} s (bound {KEY_CACHE_SECONDS:g} s), "
        f"tiers.yaml edit after {config_edit:.2f} s (bound {CONFIG_RELOAD_SECONDS:g} s), "
        f"revocation after {revocation:.2f} s (bound {KEY_CACHE_SECONDS:g} s); ledger check clean"
    )
