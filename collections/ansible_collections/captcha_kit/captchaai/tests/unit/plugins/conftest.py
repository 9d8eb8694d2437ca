# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures of the captchaai unit tests: a getbalance double on 127.0.0.1, a key made now."""

from __future__ import annotations

import secrets

import pytest
from ansible_collections.captcha_kit.captchaai.tests.unit.plugins.getbalance_fake import (
    GetbalanceFake,
)

PROXY_ENV = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture
def provider(monkeypatch):
    """The double, reached directly (no proxy from the caller's environment)."""
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    with GetbalanceFake() as fake:
        yield fake


@pytest.fixture
def key():
    return secrets.token_hex(16)
