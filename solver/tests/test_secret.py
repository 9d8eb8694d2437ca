import gc
import json
import logging
import pickle

import pytest

from captcha_solver.secret import REGISTRY, Secret, fingerprint

from .helpers import new_key


def test_every_text_form_is_masked():
    raw = new_key()
    s = Secret(raw)
    masked = "***" + raw[-4:]
    assert str(s) == masked
    assert repr(s) == f"Secret('{masked}')"
    assert f"{s}" == masked
    assert f"{s:>12}" == f"{masked:>12}"
    assert "%s %r" % (s, s) == f"{masked} Secret('{masked}')"  # noqa: UP031
    assert json.dumps({"k": s}, default=str) == json.dumps({"k": masked})
    assert raw not in repr([s, {"k": s}])
    assert s.reveal() == raw


def test_short_values_show_no_suffix():
    assert fingerprint("abc") == "***"
    assert str(Secret("1234567")) == "***"


def test_equality_and_hash_by_value():
    raw = new_key()
    assert Secret(raw) == Secret(raw)
    assert Secret(raw) != Secret(new_key())
    assert len({Secret(raw), Secret(raw)}) == 1
    assert Secret(raw) != raw  # never equal to a plain str


def test_cannot_be_pickled():
    with pytest.raises(TypeError):
        pickle.dumps(Secret(new_key()))


def test_rejects_non_str():
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]


def test_registry_masks_known_values_in_text():
    raw = new_key()
    held = Secret(raw)
    assert REGISTRY.mask(f"key={raw}!") == f"key=***{raw[-4:]}!"
    assert held


def test_registry_forgets_a_value_once_no_secret_holds_it():
    """A rotated-away key is not kept in memory for masking: the registry holds the values of
    live Secret objects only (two objects of one value keep it until both are gone)."""
    raw = new_key()
    first, second = Secret(raw), Secret(raw)
    assert raw in set(REGISTRY)
    del first
    gc.collect()
    assert raw in set(REGISTRY)
    del second
    gc.collect()
    assert raw not in set(REGISTRY)
    assert REGISTRY.mask(f"key={raw}") == f"key={raw}"


def test_exception_with_secret_is_masked():
    raw = new_key()
    s = Secret(raw)
    exc = ValueError(f"bad key {s}")
    assert raw not in str(exc)
    logging.getLogger("x").debug("%s", s)
