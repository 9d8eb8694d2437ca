"""Fixtures of the playbook test suites; they live in harness.py with the helpers."""

from harness import playbook, snapshot, vault, vault_client  # noqa: F401
