"""The admin API against its own OpenAPI document (``/admin/openapi.json``), with schemathesis.

For every documented operation schemathesis generates requests, valid ones and ones that
break the schema, and checks every answer: no 5xx, a documented status code, the documented
content type and headers, a body that validates against the documented schema, a valid
request not refused and a call without the token refused. The users and keys in paths are
random (404s), a live user's and key's, or a user whose Redis account is gone (as after a
loss of Redis's data).

How it runs: the proxy is the aiohttp test server that ``start_proxy`` starts on the test's
event loop. schemathesis sends its cases with ``requests`` (blocking) and has in-process
transports only for ASGI and WSGI apps, not aiohttp; so the test loads the served document
with ``schemathesis.openapi.from_dict``, builds a Hypothesis test over
``operation.as_strategy(...)`` and runs it in a worker thread (``asyncio.to_thread``) that
calls the server's URL with ``case.call`` and ``case.validate_response`` while the loop
keeps serving. Derandomized: the same cases every run. ``SCHEMATHESIS_MAX_EXAMPLES`` runs
more of them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import hypothesis
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis import GenerationMode

from proxy.admin.openapi import PATHS

from .support import admin as db
from .support.admin import ADMIN_TOKEN, bearer
from .support.servers import fresh_database

OPERATIONS = [(method.upper(), path) for path, methods in PATHS.items() for method in methods]
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "40"))
CHECKS = [
    getattr(schemathesis.checks, name)
    for name in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "positive_data_acceptance",
        "ignored_auth",
    )
]
#: 400s for rules across parameters, which no parameter's schema can say (their descriptions do)
CROSS_PARAMETER_RULES = ("period=range needs from and to", "to must not be before from", "a range may cover at most")


@pytest.fixture(scope="module")
def fuzzed_db(servers: tuple[str, str]):
    """A database of its own: the users and credits the fuzzer makes stay out of the run's."""
    with fresh_database(servers[1]) as url:
        yield url


@pytest.fixture
def settings(settings, fuzzed_db):
    return replace(settings, database_url=fuzzed_db)


def error_message(response: Any) -> str:
    """The message of an error answer; the start of any other body."""
    try:
        return str(orjson.loads(response.content)["error"]["message"])
    except (ValueError, TypeError, KeyError):
        return response.content[:80].decode(errors="replace")


def cross_parameter_rule(failure: Any, response: Any) -> bool:
    """A valid request refused (ST202) by a rule across parameters."""
    return failure.code == "ST202" and response.status_code == 400 and error_message(response).startswith(CROSS_PARAMETER_RULES)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
async def test_operation_answers_as_documented(start_proxy, make_customer, pool, method: str, path: str):
    proxy = await start_proxy(admin_token=ADMIN_TOKEN)
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/admin/openapi.json") as resp:
        document = await resp.json()
    operation = schemathesis.openapi.from_dict(document)[path][method]
    customer = await make_customer("starter")
    lost = f"usr_lost_{uuid.uuid4().hex[:8]}"  # in Postgres, not in Redis
    async with pool.acquire() as conn:
        await db.user(conn, lost, "starter", datetime.now(UTC))
    known = [{"user": customer.user_id, "key": customer.key_id}, {"user": lost}]
    named = [{k: v for k, v in ids.items() if f"{{{k}}}" in path} for ids in known]
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
        *(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=ids) for ids in named if ids),
    )
    failures: dict[str, str] = {}  # one report per distinct failure

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # failures are collected, never shrunk
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=strategy)
    def explore(case: schemathesis.Case) -> None:
        sent = {"base_url": proxy.url, "session": session, "headers": bearer(), "timeout": 10}
        response = case.call(**sent)
        try:
            case.validate_response(response, checks=CHECKS, headers=bearer(), transport_kwargs=sent)
        except schemathesis.errors.FailureGroup as group:
            for failure in group.exceptions:
                if not cross_parameter_rule(failure, response):
                    found = f"{failure.code} {failure.title} [{response.status_code}]"
                    found += f" {error_message(response)}" if response.status_code >= 400 else ""
                    failures.setdefault(found, str(group))

    with requests.Session() as session:
        await asyncio.to_thread(explore)
    assert not failures, "\n\n".join(f"{found}\n{report}" for found, report in failures.items())
