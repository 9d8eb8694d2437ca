"""Fixtures of the playbook suites: the shared test Vault (testkit.fixtures) and the rotation
suites' environments and workers (testkit.rotation). A session holds the machine's test-port
lock (testkit.portlock) while it runs."""

from testkit.cpu_report import pytest_runtest_protocol, pytest_terminal_summary  # noqa: F401
from testkit.fixtures import (  # noqa: F401
    playbook,
    pytest_sessionfinish,
    pytest_sessionstart,
    snapshot,
    vault,
    vault_client,
)
from testkit.rotation import admin, emulator, provisioned, rot_env, start_workers  # noqa: F401
