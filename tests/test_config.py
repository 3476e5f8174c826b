"""pricing.yaml / tiers.yaml: exact prices, precise errors, reload without restart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml

from proxy import metrics
from proxy.config import ConfigError, load_config
from proxy.pricing import ServiceTier, Usage

ROOT = Path(__file__).resolve().parent.parent


def problems(pricing: Path, tiers: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(pricing, tiers)
    return err.value.problems


def edit(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_shipped_files_are_valid_and_allowances_match_the_tiers():
    config = load_config(ROOT / "pricing.yaml", ROOT / "tiers.yaml")
    allowances = {name: t.allowance_micro for name, t in config.tiers.tiers.items()}
    # exact µ$, to the last micro-dollar: free has monthly_credits 50 (× 10,000 µ$); the paid
    # tiers are price_usd × api_budget_ratio 0.20
    assert allowances == {
        "free": 500_000,  # 50 credits
        "starter": 3_800_000,  # $19 × 0.20 = $3.80
        "professional": 19_800_000,  # $99 × 0.20 = $19.80
        "enterprise": 99_800_000,  # $499 × 0.20 = $99.80
    }


def test_cost_is_exact_and_rounded_up_once():
    model = load_config(ROOT / "pricing.yaml", ROOT / "tiers.yaml").prices.find("openai", "gpt-4o-mini")
    # 1 input token at $0.15/1M = 0.15 µ$: rounds up to 1 µ$, never down to 0
    assert model.cost_micro(Usage(input_tokens=1)) == 1
    # 7 input + 3 cached + 11 output = 1.05 + 0.225 + 6.6 = 7.875 µ$ → 8 (one rounding, not three)
    assert model.cost_micro(Usage(input_tokens=7, cached_input_tokens=3, output_tokens=11)) == 8
    assert model.cost_micro(Usage(input_tokens=1_000_000, output_tokens=1_000_000)) == 750_000
    # priority service tier prices apply when the request asks for them
    assert model.cost_micro(Usage(input_tokens=1_000_000), service_tier=ServiceTier.PRIORITY) == 250_000


def test_dated_snapshots_fall_back_to_their_alias_unless_listed():
    prices = load_config(ROOT / "pricing.yaml", ROOT / "tiers.yaml").prices
    assert prices.find("openai", "gpt-4o-2024-08-06").name == "gpt-4o"
    assert prices.find("openai", "gpt-4o-2024-05-13").name == "gpt-4o-2024-05-13"
    assert prices.find("openai", "gpt-4o-turbo-imaginary") is None


def test_long_context_prices_apply_above_the_threshold(config_files):
    pricing, tiers = config_files
    edit(
        pricing,
        lambda d: d["providers"]["openai"]["models"]["gpt-4o"].update(
            long_context={"above_input_tokens": 1000, "input_per_1m": 5, "output_per_1m": 20}
        ),
    )
    model = load_config(pricing, tiers).prices.find("openai", "gpt-4o")
    assert model.cost_micro(Usage(input_tokens=1000, output_tokens=100)) == 1000 * 2.5 + 100 * 10
    assert model.cost_micro(Usage(input_tokens=1001, output_tokens=100)) == 1001 * 5 + 100 * 20


def test_errors_name_file_key_and_problem(config_files):
    pricing, tiers = config_files
    edit(pricing, lambda d: d["providers"]["openai"]["models"]["gpt-4o"].update(input_per_1m="cheap", colour="red"))
    edit(tiers, lambda d: d["tiers"]["starter"].update(monthly_tokens=-5))
    found = problems(pricing, tiers)
    assert f"{pricing}: providers.openai.models.gpt-4o.input_per_1m: Input should be a valid decimal (got 'cheap')" in found
    assert f"{pricing}: providers.openai.models.gpt-4o.colour: Extra inputs are not permitted (got 'red')" in found
    assert f"{tiers}: tiers.starter.monthly_tokens: Input should be greater than or equal to 0 (got -5)" in found


def test_cross_file_mistakes_are_caught(config_files):
    pricing, tiers = config_files
    edit(tiers, lambda d: d["tiers"]["starter"].update(providers=["openai", "anthropicc"], models=["gpt-4o-mini", "gtp-*"]))
    found = problems(pricing, tiers)
    assert any("tiers.starter.providers.1: 'anthropicc' is not a provider in" in p for p in found)
    assert any("tiers.starter.models.1: 'gtp-*' matches no model" in p for p in found)


def test_too_precise_price_and_yaml_syntax(config_files):
    pricing, tiers = config_files
    edit(pricing, lambda d: d["providers"]["openai"]["models"]["gpt-4o"].update(output_per_1m=0.0000001))
    assert any("more than 6 decimals" in p for p in problems(pricing, tiers))
    tiers.write_text("tiers:\n  free: [unclosed\n")
    (found,) = problems(ROOT / "pricing.yaml", tiers)
    assert found.startswith(f"{tiers}:3:1: not valid YAML")


def test_config_check_cli_exit_codes(config_files):
    pricing, tiers = config_files
    env = {"PRICING_FILE": str(pricing), "TIERS_FILE": str(tiers), "PATH": ""}
    ok = subprocess.run([sys.executable, "-m", "proxy.cli", "config", "check"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ")
    edit(tiers, lambda d: d["tiers"]["free"].pop("providers"))
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "config", "check"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"{tiers}: tiers.free.providers: Field required" in bad.stderr


def _reloads(result: str) -> float:
    return metrics.CONFIG_RELOADS.labels(result=result)._value.get()


async def _until(predicate, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_edits_reload_without_restart_and_bad_edits_keep_the_last_good(config_files, make_customer, openai_client):
    pricing, tiers = config_files
    customer = await make_customer("starter")
    client = openai_client(customer.api_key)
    await client.chat.completions.create(model="gpt-4.1", messages=[], max_tokens=5)

    reloaded = _reloads("ok")
    edit(tiers, lambda d: d["tiers"]["starter"].update(models=["gpt-4o-mini"]))
    # The test proxy polls every 0.1 s; a busy CI machine may take longer than any fixed wait.
    await _until(lambda: _reloads("ok") > reloaded)
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="gpt-4.1", messages=[], max_tokens=5)

    tiers.write_text(tiers.read_text().replace("starter:", "starter: [broken", 1))
    await _until(lambda: metrics.CONFIG_RELOAD_OK._value.get() == 0)
    # still the last good config: gpt-4o-mini allowed, gpt-4.1 refused
    await client.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="gpt-4.1", messages=[], max_tokens=5)

    edit(pricing, lambda d: None)  # touch: both files are re-read, tiers still broken
    tiers.write_text((ROOT / "tiers.yaml").read_text())
    await _until(lambda: metrics.CONFIG_RELOAD_OK._value.get() == 1)
    await client.chat.completions.create(model="gpt-4.1", messages=[], max_tokens=5)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "greater than 0"),
        (-1, "greater than 0"),
        (1.23456, "no more than 4 decimal places"),
        ("lots", "valid decimal"),
    ],
)
def test_max_request_credits_is_a_positive_amount_of_credits(config_files, value, problem):
    pricing, tiers = config_files
    edit(tiers, lambda d: d["tiers"]["starter"].update(max_request_credits=value))
    assert any("tiers.starter.max_request_credits" in p and problem in p for p in problems(pricing, tiers)), problems(
        pricing, tiers
    )


def test_max_request_credits_is_exact_in_micro_dollars(config_files):
    pricing, tiers = config_files
    edit(tiers, lambda d: d["tiers"]["starter"].update(max_request_credits="2.5001"))
    assert load_config(pricing, tiers).tiers.tiers["starter"].max_request_micro == 25_001


def test_default_service_tier_takes_only_a_known_tier(config_files):
    pricing, tiers = config_files
    edit(pricing, lambda d: d["providers"]["openai"].update(default_service_tier="scale"))
    assert any("providers.openai.default_service_tier" in p for p in problems(pricing, tiers))
