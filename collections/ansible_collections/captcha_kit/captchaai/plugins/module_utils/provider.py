# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Asking CaptchaAI (or a compatible service) whether it accepts an API key.

``check_key(provider_url, key, timeout) -> (accepted, detail)``
    POSTs ``action=getbalance`` to ``<provider_url>/res.php`` (the key in the body, never in
    the URL). ``accepted`` is ``True`` (``detail`` = ``balance <amount>``), ``False`` (the
    provider's error code, e.g. ``ERROR_KEY_DOES_NOT_EXIST``) or ``None`` when the provider
    could not be asked (``detail`` says why). Plain ``http://`` is used only to a loopback
    address (a local emulator or proxy): elsewhere it would send the key in clear.

``mask_key(key)``
    ``***`` and the last four characters, the only way the kit ever shows a key (the same rule
    as ``captcha_kit.vault``'s contract).
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlencode, urlsplit

from ansible.module_utils.urls import open_url


def mask_key(key):
    """The masked fingerprint of a key: ``***`` and its last four characters."""
    if not key:
        return ""
    return "***" + str(key)[-4:]


def _clear_text_refusal(url):
    """Why ``url`` must not carry a key, or None when it may."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return None
    if parts.scheme != "http" or not parts.hostname:
        return f"provider_url {url!r} is not an http(s) URL"
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"plain http:// to {host!r} would send the key in clear: use https:// (plain http:// "
        "is allowed only to a loopback address, e.g. a local emulator or proxy)"
    )


def check_key(provider_url, key, timeout=10):
    """``(True, "balance …")``, ``(False, error code)`` or ``(None, why it was not asked)``."""
    url = (provider_url or "").rstrip("/")
    if not url:
        return None, "no provider_url set"
    refusal = _clear_text_refusal(url)
    if refusal:
        return None, refusal
    body = urlencode({"key": key, "action": "getbalance", "json": "1"})
    http_error = None
    try:
        resp = open_url(
            f"{url}/res.php",
            data=body,
            method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=timeout,
        )
        text = resp.read().decode("utf-8", "replace").strip()
    except Exception as exc:
        http_error = getattr(exc, "code", None)
        if http_error is None:
            return None, f"provider at {url} not reachable ({type(exc).__name__})"
        try:
            text = exc.read().decode("utf-8", "replace").strip()
        except Exception:
            return None, f"provider answered HTTP {http_error}"
    return _answer(text, http_error)


def _answer(text, http_error=None):
    """Read a getbalance answer: JSON (``{"status": 1, "request": "5.00"}``) or plain text
    (``5.00`` or ``ERROR_...``). Under an HTTP error only an answer in the provider's own terms
    counts; anything else (a proxy's error page) means the provider was not asked."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        if text.startswith("ERROR"):
            doc = {"status": 0, "request": text}
        elif http_error is None:
            doc = {"status": 1, "request": text}
        else:
            return None, f"provider answered HTTP {http_error}"
    answer = str(doc.get("request", ""))[:100]
    if str(doc.get("status")) == "1":
        return True, f"balance {answer}"
    return False, answer or "empty answer"
