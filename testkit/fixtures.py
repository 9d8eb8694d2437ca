"""Pytest fixtures on the shared test Vault; a suite's conftest.py imports the ones it uses.

- ``vault`` (session): the test OpenBao (``.state/test/vault``, port 18250, docs/interfaces.md),
  started (or found running) through ``testkit.vault``. A session that started it stops it at
  its end, pass or fail; one that found it running (``make test`` starts it for both lanes)
  leaves it to whoever started it.
- ``vault_client`` (session): an ``hvac.Client`` with the root token.
- ``snapshot``: ``snapshot(only)`` -> ``vault_snapshot`` of the test server for names with ``only``.
- ``playbook``: ``testkit.playbook.run_playbook`` as a fixture.

``pytest_sessionstart`` / ``pytest_sessionfinish`` hold the machine's test-port lock
(``testkit.portlock``) for the session: import them into a suite's top conftest.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import hvac
import pytest

from testkit.paths import TEST_VAULT_DIR, TEST_VAULT_PORT
from testkit.playbook import run_playbook
from testkit.portlock import hold_test_ports
from testkit.vault import LocalVault
from testkit.vault_ops import admin_client, vault_snapshot

_PORTS = contextlib.ExitStack()


def pytest_sessionstart(session: pytest.Session) -> None:
    _PORTS.enter_context(hold_test_ports())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _PORTS.close()


@pytest.fixture(scope="session")
def vault() -> Iterator[LocalVault]:
    """The test Vault server, running, initialised and unsealed."""
    server = LocalVault(TEST_VAULT_DIR, TEST_VAULT_PORT)
    started_here = server.start() in ("started", "initialised")
    yield server
    if started_here:
        server.stop()


@pytest.fixture(scope="session")
def vault_client(vault: LocalVault) -> hvac.Client:
    """hvac client with the root token of the test server."""
    return admin_client(vault)


@pytest.fixture
def snapshot(vault_client: hvac.Client) -> Callable[[str], dict[str, Any]]:
    return lambda only: vault_snapshot(vault_client, only)


@pytest.fixture
def playbook() -> Callable[..., Any]:
    return run_playbook
