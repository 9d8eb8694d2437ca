# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""module_utils/provider.py: getbalance against a local fake on 127.0.0.1, every kind of answer."""

from __future__ import annotations

import socket

import pytest
from ansible_collections.captcha_kit.captchaai.plugins.module_utils.provider import (
    _clear_text_refusal,
    check_key,
    mask_key,
)


def test_an_accepted_key_shows_its_balance(provider, key):
    provider.accepted[key] = "5.00000"
    assert check_key(provider.url, key) == (True, "balance 5.00000")
    [(path, form)] = provider.requests
    assert path == "/res.php", "the key goes in the body, never in the URL"
    assert form == {"key": key, "action": "getbalance", "json": "1"}


def test_an_unknown_key_is_rejected_with_the_providers_code(provider, key):
    assert check_key(provider.url + "/", key) == (False, "ERROR_KEY_DOES_NOT_EXIST")


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, "7.50", (True, "balance 7.50")),
        (200, "ERROR_WRONG_USER_KEY", (False, "ERROR_WRONG_USER_KEY")),
        (200, '{"status": 0, "request": ""}', (False, "empty answer")),
        (200, '{"status": "1", "request": "0.5"}', (True, "balance 0.5")),
        (500, "ERROR_KEY_DOES_NOT_EXIST", (False, "ERROR_KEY_DOES_NOT_EXIST")),
        (403, '{"status": 0, "request": "ERROR_IP_BANNED"}', (False, "ERROR_IP_BANNED")),
        (503, "<html>Service Unavailable</html>", (None, "provider answered HTTP 503")),
        (502, "", (None, "provider answered HTTP 502")),
    ],
)
def test_answers(provider, key, status, body, expected):
    provider.answer = (status, body)
    assert check_key(provider.url, key) == expected


def test_a_provider_that_does_not_answer_was_not_asked(key):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accepted, detail = check_key(f"http://127.0.0.1:{port}", key, timeout=2)
    assert accepted is None
    assert detail.startswith(f"provider at http://127.0.0.1:{port} not reachable (")


def test_no_url_means_not_asked(key):
    assert check_key("", key) == (None, "no provider_url set")
    assert check_key(None, key) == (None, "no provider_url set")


@pytest.mark.parametrize(
    "url",
    ["https://ocr.captchaai.com", "http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1"],
)
def test_https_anywhere_and_plain_http_to_loopback_may_carry_a_key(url):
    assert _clear_text_refusal(url) is None


def test_plain_http_elsewhere_is_refused_before_any_request(key):
    accepted, detail = check_key("http://ocr.captchaai.com", key)
    assert accepted is None
    assert detail.startswith("plain http:// to 'ocr.captchaai.com' would send the key in clear")
    assert check_key("ftp://x", key) == (None, "provider_url 'ftp://x' is not an http(s) URL")


def test_mask_shows_only_the_last_four_characters(key):
    assert mask_key(key) == "***" + key[-4:]
    assert mask_key("") == mask_key(None) == ""


def test_the_mask_is_the_kits_contract(key):
    from ansible_collections.captcha_kit.vault.plugins.module_utils.contract import (
        mask_key as contract_mask,
    )

    assert mask_key(key) == contract_mask(key)
