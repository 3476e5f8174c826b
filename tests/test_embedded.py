"""Embedded mode: the first process starts Redis and PostgreSQL under DATA_DIR, others attach."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import embedded


@pytest.fixture
def data_dir(tmp_path_factory):
    # short path: Unix socket paths are limited to ~100 bytes
    path = Path(tmp_path_factory.mktemp("emb"))
    yield path
    embedded.stop_all(path)


def _in_subprocess(code: str, data_dir: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["DATA_DIR"] = str(data_dir)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_processes_share_one_embedded_redis_and_postgres(data_dir):
    url = embedded.redis_url(data_dir)
    pid = (data_dir / "redis" / "redis.pid").read_text()
    attach = f"from pathlib import Path; from proxy import embedded; print(embedded.redis_url(Path({str(data_dir)!r})))"
    assert _in_subprocess(attach, data_dir) == url
    assert (data_dir / "redis" / "redis.pid").read_text() == pid  # attached, not restarted

    migrate = "from proxy.cli import main; main(['migrate'])"
    assert "applied 001_accounts_and_ledger.sql, 002_billing.sql" in _in_subprocess(migrate, data_dir)
    assert _in_subprocess(migrate, data_dir).endswith("database is up to date")  # same server, same database
