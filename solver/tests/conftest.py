"""Shared pytest set-up for the solver tests (also when run from the repository root)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs the real local OpenBao (testkit.vault) and the CaptchaAI emulator",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """The integration tests use the kit's fixed test ports: hold the machine's lock while they
    run (the unit tests use free ports only and never wait for it)."""
    if any(item.get_closest_marker("integration") for item in session.items):
        from testkit.fixtures import pytest_sessionstart as hold

        hold(session)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from testkit.fixtures import pytest_sessionfinish as release

    release(session, exitstatus)
