# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""filter/validate.py: the cidr_errors and duration_errors filters (the modules' own rules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ansible_collections.captcha_kit.vault.plugins.filter import validate


def test_the_filters_are_published_under_their_names():
    assert validate.FilterModule().filters() == {
        "cidr_errors": validate.cidr_errors,
        "duration_errors": validate.duration_errors,
    }


@pytest.mark.parametrize(
    "values",
    [
        ["127.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32"],
        "127.0.0.1",
        [],
        None,
    ],
)
def test_good_cidrs_give_no_message(values):
    assert validate.cidr_errors(values) == []


def test_each_bad_cidr_gives_one_message_in_order():
    errors = validate.cidr_errors(["10.1.2.3/8", "127.0.0.1", "", "nowhere"])
    assert errors == [
        "malformed CIDR '10.1.2.3/8': 10.1.2.3/8 has host bits set",
        "empty CIDR",
        "malformed CIDR 'nowhere': 'nowhere' does not appear to be an IPv4 or IPv6 network",
    ]


def test_a_single_bad_cidr_string_is_one_value():
    assert validate.cidr_errors("10.0.0.1/8, 127.0.0.1") == [
        "malformed CIDR '10.0.0.1/8, 127.0.0.1': "
        "'10.0.0.1/8, 127.0.0.1' does not appear to be an IPv4 or IPv6 network"
    ]


@pytest.mark.parametrize(
    "values",
    [["1h", "30m", 300, "1h30m", "0", ""], "7d", 300, None, []],
)
def test_good_durations_give_no_message(values):
    assert validate.duration_errors(values) == []


def test_each_bad_duration_gives_one_message_in_order():
    assert validate.duration_errors(["1h", "soon", -5, "1.5h"]) == [
        "not a duration: 'soon' (use e.g. 300, '300s', '5m', '1h30m')",
        "negative duration: -5",
        "not a duration: '1.5h' (use e.g. 300, '300s', '5m', '1h30m')",
    ]


def test_the_filter_plugins_load_without_hvac():
    """Filters run on the controller in every task's worker process, which imports the plugin
    file again: none may pull in hvac and requests (about 0.2 CPU-s per task)."""
    code = (
        "import sys\n"
        "from ansible_collections.captcha_kit.vault.plugins.filter import"
        " contract, operator_policy, provision, validate\n"
        "print(sorted(m for m in ('hvac', 'requests', 'urllib3') if m in sys.modules))\n"
    )
    root = Path(validate.__file__).parents[5]  # the directory holding ansible_collections
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(root)),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert run.stdout.strip() == "[]"
