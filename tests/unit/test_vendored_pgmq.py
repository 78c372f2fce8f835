"""The vendored PGMQ install script is the upstream release's file, unmodified."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from agent.db.schema import PGMQ_SQL_RELEASE, PGMQ_SQL_SHA256, bundled_pgmq_sql

INSTALL = f"pip install --no-deps pgmq=={PGMQ_SQL_RELEASE}  (scripts/test does this)"


def test_the_vendored_script_has_the_recorded_digest():
    assert hashlib.sha256(bundled_pgmq_sql().encode()).hexdigest() == PGMQ_SQL_SHA256


def test_the_vendored_script_is_the_released_file_byte_for_byte():
    try:
        dist = distribution("pgmq")
    except PackageNotFoundError:
        pytest.fail(f"the `pgmq` distribution to compare with is not installed: {INSTALL}")
    assert dist.version == PGMQ_SQL_RELEASE, f"installed pgmq {dist.version}, vendored {PGMQ_SQL_RELEASE}: {INSTALL}"
    released = Path(str(dist.locate_file("pgmq/sql/pgmq.sql"))).read_bytes()
    assert bundled_pgmq_sql().encode() == released


def test_the_agent_does_not_depend_on_the_pgmq_client():
    requires = distribution("pgmq-edge-agent").requires or []
    assert not [r for r in requires if r.split(";")[0].strip().lower().startswith("pgmq")]
