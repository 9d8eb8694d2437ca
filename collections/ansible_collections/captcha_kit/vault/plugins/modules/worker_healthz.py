#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: poll a captcha-solver worker's /healthz until it reports a key version."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: worker_healthz
short_description: Poll a worker's /healthz until it reports the key version asked for
version_added: 0.2.0
description:
  - Runs on the worker host and polls the worker's C(/healthz) (plain HTTP on its loopback) in
    one module run, until the answer shows the key version asked for, until the worker's
    provider check says that version's key is rejected (no point waiting longer), or until the
    deadline. One process per host for the whole wait, where an C(until) loop around
    M(ansible.builtin.uri) starts one per poll.
  - A 503 answer still carries the worker's health document and counts as an answer.
  - Never fails on what the worker says; the play judges RV(json), RV(status) and RV(outcome).
    It fails only on bad options.
  - Never changes anything, so check mode polls the same way.
options:
  url:
    description: The worker's health endpoint, for example C(http://127.0.0.1:8080/healthz).
    type: str
    required: true
  version:
    description:
      - The key version to wait for (the answer's C(key_version)). Without it, any key version.
    type: str
  require_provider_accepted:
    description:
      - Also wait until the worker's provider accepted that version's key from this worker, its
        circuit is closed and it answers HTTP 200. The wait then also ends when the worker's
        provider check of that version says C(rejected).
    type: bool
    default: false
  deadline:
    description:
      - When to stop waiting, in seconds since the epoch (UTC), so that every host of a fan-out
        stops at the same moment. The last poll starts before it.
    type: float
  timeout:
    description: How long to wait, in seconds from the start of the module, without O(deadline).
    type: float
    default: 60
  delay:
    description: Seconds between two polls.
    type: float
    default: 1
  request_timeout:
    description: Timeout in seconds of one request.
    type: float
    default: 5
attributes:
  check_mode:
    description: Polls the same way in check mode; nothing is changed.
    support: full
  diff_mode:
    description: No diff; nothing is changed.
    support: none
author:
  - captcha key vault kit contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Wait until the worker reports version 7 and the provider accepted its key
  captcha_kit.vault.worker_healthz:
    url: http://127.0.0.1:8080/healthz
    version: "7"
    require_provider_accepted: true
    deadline: "{{ now(utc=true).timestamp() + 120 }}"
  register: poll
"""

RETURN = r"""
json:
  description: The worker's last health document (empty when it never answered).
  returned: always
  type: dict
status:
  description: HTTP status of the last answer, 0 when there was none.
  returned: always
  type: int
outcome:
  description:
    - V(ready) when the worker reports what was asked, V(rejected) when its provider check of
      that version says rejected, V(timeout) when the deadline passed first.
  returned: always
  type: str
attempts:
  description: How many polls were made.
  returned: always
  type: int
msg:
  description: What the last poll saw, for example C(no answer at http://127.0.0.1:8080/healthz).
  returned: always
  type: str
"""

import json
import time
import urllib.error

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

OPTIONS = {
    "url": {"type": "str", "required": True},
    "version": {"type": "str"},
    "require_provider_accepted": {"type": "bool", "default": False},
    "deadline": {"type": "float"},
    "timeout": {"type": "float", "default": 60},
    "delay": {"type": "float", "default": 1},
    "request_timeout": {"type": "float", "default": 5},
}


def read_health(url, timeout):
    """``(status, document, message)`` of one GET; status 0 when nothing answered."""
    try:
        with open_url(url, timeout=timeout, validate_certs=True) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:  # a 503 still carries the health document
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return 0, {}, f"no answer at {url}: {exc}"
    try:
        document = json.loads(body)
    except ValueError:
        return status, {}, f"HTTP {status} without a health document at {url}"
    if not isinstance(document, dict):
        return status, {}, f"HTTP {status} without a health document at {url}"
    return status, document, f"HTTP {status}"


def _same(value, version):
    return value is not None and str(value) == str(version)


def judge(status, health, version, require_provider_accepted):
    """``ready``, ``rejected`` or None (keep polling) for one answer."""
    reported = health.get("key_version")
    on_target = reported is not None if version is None else _same(reported, version)
    if not on_target:
        return None
    if not require_provider_accepted:
        return "ready"
    target = reported if version is None else version
    if (
        _same(health.get("provider_accepted_version"), target)
        and health.get("circuit") == "closed"
        and status == 200
    ):
        return "ready"
    check = health.get("provider_check") or {}
    if _same(check.get("version"), target) and check.get("result") == "rejected":
        return "rejected"
    return None


def wait(params, clock=time.time, sleep=time.sleep):
    """Poll until ``judge`` says ready or rejected, or the deadline passes; the result dict."""
    deadline = params["deadline"]
    if deadline is None:
        deadline = clock() + params["timeout"]
    attempts = 0
    while True:
        attempts += 1
        status, health, message = read_health(params["url"], params["request_timeout"])
        outcome = judge(status, health, params["version"], params["require_provider_accepted"])
        if outcome is None and clock() + params["delay"] >= deadline:
            outcome = "timeout"
        if outcome is not None:
            return {
                "json": health,
                "status": status,
                "outcome": outcome,
                "attempts": attempts,
                "msg": message,
            }
        sleep(params["delay"])


def main():
    module = AnsibleModule(argument_spec=OPTIONS, supports_check_mode=True)
    p = module.params
    if p["delay"] <= 0 or p["request_timeout"] <= 0:
        module.fail_json(msg="delay and request_timeout must be positive")
    module.exit_json(changed=False, **wait(p))


if __name__ == "__main__":
    main()
