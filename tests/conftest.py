"""Fixtures of the playbook suites: the shared test Vault (testkit.fixtures) and the rotation
suites' environments and workers (testkit.rotation)."""

from testkit.fixtures import playbook, snapshot, vault, vault_client  # noqa: F401
from testkit.rotation import admin, emulator, provisioned, rot_env, start_workers  # noqa: F401
