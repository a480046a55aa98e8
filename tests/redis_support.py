"""Fixtures shared by the tests that talk to the session's real redis-server (import them by name)."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def tenant() -> str:
    """A tenant id no other test uses: the Redis server is shared by the whole session."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(redis_server):
    """A redis-py client of the session's server, closed after the test."""
    c = redis_server.client()
    yield c
    c.close()
