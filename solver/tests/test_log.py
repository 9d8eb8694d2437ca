import io
import json
import logging

from captcha_solver.log import SecretMaskingFilter, configure_logging
from captcha_solver.secret import Secret

from .helpers import new_key


def _capture(fmt: str) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt, "DEBUG", stream=stream)
    return stream


def test_json_lines_with_extras():
    stream = _capture("json")
    logging.getLogger("captcha_solver.t").info("hello %s", "world", extra={"key_version": 3})
    entry = json.loads(stream.getvalue().strip())
    assert entry["msg"] == "hello world"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "captcha_solver.t"
    assert entry["key_version"] == 3


def test_raw_secret_values_are_masked_everywhere():
    raw = new_key()
    held = Secret(raw)  # registers the value while it is held
    for fmt in ("json", "text"):
        stream = _capture(fmt)
        logger = logging.getLogger("captcha_solver.t")
        logger.info("raw in message %s", raw)
        logger.warning("raw in extra", extra={"detail": f"k={raw}"})
        try:
            raise RuntimeError(f"raw in exception {raw}")
        except RuntimeError:
            logger.exception("failed")
        out = stream.getvalue()
        assert raw not in out
        assert out.count("***" + raw[-4:]) >= 3
    assert held


def test_filter_rewrites_record():
    raw = new_key()
    held = Secret(raw)
    record = logging.LogRecord("x", logging.INFO, "f", 1, "v=%s", (raw,), None)
    assert SecretMaskingFilter().filter(record)
    assert record.getMessage() == f"v=***{raw[-4:]}"
    assert held


def teardown_module():
    logging.getLogger().handlers.clear()
