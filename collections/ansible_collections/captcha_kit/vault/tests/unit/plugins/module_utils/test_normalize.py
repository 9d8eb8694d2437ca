# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""module_utils/normalize.py: durations, CIDRs, lists and dict differences."""

from __future__ import annotations

import re

import pytest
from ansible_collections.captcha_kit.vault.plugins.module_utils import normalize


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 0),
        ("", 0),
        ("   ", 0),
        (0, 0),
        (45, 45),
        ("45", 45),
        ("90s", 90),
        ("5m", 300),
        ("1h30m", 5400),
        ("1h0m0s", 3600),
        ("7d", 604800),
        (" 2H ", 7200),
        ("1d1h1m1s", 90061),
    ],
)
def test_durations_are_normalised_to_seconds(value, seconds):
    assert normalize.ttl_to_seconds(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "not a duration: 'soon' (use e.g. 300, '300s', '5m', '1h30m')"),
        ("1.5h", "not a duration: '1.5h'"),
        ("5x", "not a duration: '5x'"),
        ("h", "not a duration: 'h'"),
        ("-5", "not a duration: '-5'"),
        ("1 h", "not a duration: '1 h'"),
        (-1, "negative duration: -1"),
        (True, "not a duration: True"),
    ],
)
def test_what_is_not_a_duration_is_refused(value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        normalize.ttl_to_seconds(value)


@pytest.mark.parametrize(
    ("value", "cidr"),
    [
        ("127.0.0.1", "127.0.0.1/32"),
        (" 10.0.0.0/8 ", "10.0.0.0/8"),
        ("::1", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_addresses_and_cidrs_are_normalised(value, cidr):
    assert normalize.normalize_cidr(value) == cidr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty CIDR"),
        ("10.0.0.1/8", "malformed CIDR '10.0.0.1/8': 10.0.0.1/8 has host bits set"),
        ("300.1.1.1", "malformed CIDR '300.1.1.1'"),
        ("10.0.0.0/33", "malformed CIDR '10.0.0.0/33'"),
        ("localhost", "malformed CIDR 'localhost'"),
    ],
)
def test_malformed_cidrs_are_refused(value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        normalize.normalize_cidr(value)


def test_cidr_lists_are_sorted_deduplicated_and_skip_empties():
    assert normalize.normalize_cidr_list("127.0.0.1, 10.0.0.0/8,,127.0.0.1/32") == [
        "10.0.0.0/8",
        "127.0.0.1/32",
    ]
    assert normalize.normalize_cidr_list(["::1", " "]) == ["::1/128"]
    assert normalize.normalize_cidr_list(None) == []


def test_string_lists_are_sorted_deduplicated_stripped_and_skip_empties():
    assert normalize.normalize_str_list("read, list,read,") == ["list", "read"]
    assert normalize.normalize_str_list([" b", "a", "", "b"]) == ["a", "b"]
    assert normalize.normalize_str_list(None) == []


def test_dict_difference_keeps_the_desired_values_that_differ():
    current = {"a": 1, "b": 2, "extra": 9}
    assert normalize.dict_difference(current, {"a": 1, "b": 3, "c": 4}) == {"b": 3, "c": 4}
    assert normalize.dict_difference(None, {"a": 1}) == {"a": 1}
    assert normalize.dict_difference(current, {}) == {}
