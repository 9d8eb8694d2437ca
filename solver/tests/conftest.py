"""Shared pytest set-up for the solver tests (also when run from the repository root)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs the real local OpenBao (testkit.vault) and the CaptchaAI emulator",
    )
