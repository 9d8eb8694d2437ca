#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: ask CaptchaAI whether it accepts an API key (getbalance)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: key_check
short_description: Ask CaptchaAI whether it accepts an API key (getbalance), never showing the key
version_added: 0.1.0
description:
  - Calls the provider's C(res.php?action=getbalance) with the key in a POST body and reports
    whether the provider accepts it. Read-only at the provider (a balance query); never changes
    anything, so check mode runs the same query.
  - With O(expect=accepted) (a new key before it is written) the task fails unless the provider
    accepts the key; with O(expect=rejected) (an old key after its revocation) it fails while the
    provider still accepts it. O(fail_on_mismatch=false) turns those failures into warnings.
  - A provider that cannot be asked (unreachable, an HTTP error without an answer, no URL) is a
    mismatch either way, with the reason.
  - Plain C(http://) is used only to a loopback address (a local emulator or proxy); elsewhere it
    would send the key in clear, and the check fails with that reason.
  - The key is never returned or logged; results show its masked fingerprint (C(***ab12)).
options:
  key:
    description: The API key to check. Never returned or logged.
    type: str
    required: true
  provider_url:
    description: CaptchaAI-compatible base URL; C(<provider_url>/res.php) is called.
    type: str
    required: true
  expect:
    description: Whether the key should be accepted (a new key) or rejected (a revoked key).
    type: str
    choices: [accepted, rejected]
    default: accepted
  fail_on_mismatch:
    description: Fail when the answer is not the expected one; V(false) warns instead.
    type: bool
    default: true
  label:
    description: How messages name the key, for example C(new key) or C(old key).
    type: str
    default: key
  timeout:
    description: Timeout in seconds of the provider call.
    type: int
    default: 10
attributes:
  check_mode:
    description: Runs the same read-only query in check mode.
    support: full
  diff_mode:
    description: No diff; nothing is changed.
    support: none
seealso:
  - module: captcha_kit.vault.key_rotation_state
author:
  - captcha key vault kit contributors
"""

EXAMPLES = r"""
- name: Refuse a new key the provider does not accept
  captcha_kit.captchaai.key_check:
    key: "{{ new_key }}"
    provider_url: https://ocr.captchaai.com
    label: new key
  no_log: true

- name: Warn while the provider still accepts the revoked old key
  captcha_kit.captchaai.key_check:
    key: "{{ old_key }}"
    provider_url: https://ocr.captchaai.com
    expect: rejected
    fail_on_mismatch: false
    label: old key
  register: old_key_check
  no_log: true
"""

RETURN = r"""
accepted:
  description:
    - V(true) when the provider accepts the key, V(false) when it rejects it, V(null) when it
      could not be asked.
  returned: always
  type: bool
as_expected:
  description: Whether the answer is the one O(expect) asked for.
  returned: always
  type: bool
detail:
  description:
    - The provider's answer (C(balance 5.00000), C(ERROR_KEY_DOES_NOT_EXIST)) or why it could not
      be asked. Never the key.
  returned: always
  type: str
fingerprint:
  description: Masked fingerprint of the key (C(***ab12)).
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.captcha_kit.captchaai.plugins.module_utils.provider import (
    check_key,
    mask_key,
)

OPTIONS = {
    "key": {"type": "str", "required": True, "no_log": True},
    "provider_url": {"type": "str", "required": True},
    "expect": {"type": "str", "default": "accepted", "choices": ["accepted", "rejected"]},
    "fail_on_mismatch": {"type": "bool", "default": True},
    "label": {"type": "str", "default": "key"},
    "timeout": {"type": "int", "default": 10},
}


def mismatch_message(expect, label, fingerprint, accepted, detail):
    """What to say when the answer is not the expected one."""
    if expect == "accepted":
        return f"The provider did not accept the {label} ({fingerprint}): {detail}"
    if accepted is None:
        return f"Could not check the {label} at the provider: {detail}"
    return (
        f"The provider still accepts the {label} {fingerprint} ({detail}): revoke it at the "
        "provider now"
    )


def main():
    module = AnsibleModule(argument_spec=OPTIONS, supports_check_mode=True)
    p = module.params
    key = p["key"].strip()
    accepted, detail = check_key(p["provider_url"], key, p["timeout"])
    expected = accepted is (p["expect"] == "accepted")
    result = {
        "changed": False,
        "accepted": accepted,
        "as_expected": expected,
        "detail": detail,
        "fingerprint": mask_key(key),
    }
    if not expected:
        message = mismatch_message(p["expect"], p["label"], result["fingerprint"], accepted, detail)
        if p["fail_on_mismatch"]:
            module.fail_json(msg=message, **result)
        module.warn(message)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
