"""Shared pytest set-up for the solver tests (also when run from the repository root)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs the real local OpenBao (testkit.vault) and the CaptchaAI emulator",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    """The integration tests use the kit's fixed test ports: hold the machine's lock."""
    from testkit.fixtures import pytest_sessionstart as hold

    hold(session)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from testkit.fixtures import pytest_sessionfinish as release

    release(session, exitstatus)
