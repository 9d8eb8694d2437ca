# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""worker_healthz against a /healthz on 127.0.0.1 that answers what each test scripts."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.captcha_kit.vault.plugins.modules import worker_healthz

HEALTHY = {"status": "ok", "circuit": "closed", "env": "prod"}


class Healthz:
    """A worker's /healthz: answers ``(status, document)`` from ``answers`` in turn, the last
    one again once they run out; counts the requests."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = 0
        healthz = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                i = min(healthz.requests, len(healthz.answers) - 1)
                healthz.requests += 1
                status, document = healthz.answers[i]
                body = document if isinstance(document, bytes) else json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/healthz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def healthz():
    made = []

    def make(*answers):
        made.append(Healthz(answers))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def poll(capsys, monkeypatch):
    """``poll(**params) -> result``: main() as Ansible runs it, with short delays."""
    monkeypatch.setattr(basic.AnsibleModule, "_log_invocation", lambda module: None)

    def run(**params):
        args = {"delay": 0.01, "timeout": 5, **params}
        with patch_module_args(args), pytest.raises(SystemExit):
            worker_healthz.main()
        return json.loads(capsys.readouterr().out)

    return run


def wait_polls(url, polls, **params):
    """``wait()`` against ``url`` for exactly ``polls`` polls: a clock that moves only when the
    module sleeps, so a busy machine cannot change how many polls fit before the deadline."""
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    options = {
        "url": url,
        "version": None,
        "require_provider_accepted": False,
        "deadline": polls - 0.5,
        "timeout": 60,
        "delay": 1.0,
        "request_timeout": 5,
        **params,
    }
    return worker_healthz.wait(options, clock=lambda: now[0], sleep=sleep)


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(worker_healthz) == []


def test_polls_until_the_worker_reports_the_version_and_the_providers_acceptance(healthz, poll):
    server = healthz(
        (200, {**HEALTHY, "key_version": 6, "provider_accepted_version": 6}),
        (503, {**HEALTHY, "status": "unhealthy", "key_version": 7}),  # moved, not proven
        (200, {**HEALTHY, "key_version": 7, "provider_accepted_version": 6}),
        (200, {**HEALTHY, "key_version": 7, "provider_accepted_version": 7}),
    )
    result = poll(url=server.url, version="7", require_provider_accepted=True)
    assert result["outcome"] == "ready"
    assert result["changed"] is False
    assert (result["status"], result["attempts"], server.requests) == (200, 4, 4)
    assert result["json"]["provider_accepted_version"] == 7


def test_without_the_providers_acceptance_the_version_is_enough(healthz, poll):
    server = healthz((503, {**HEALTHY, "status": "unhealthy", "key_version": 7}))
    result = poll(url=server.url, version="7")
    assert (result["outcome"], result["status"], result["attempts"]) == ("ready", 503, 1)


def test_an_open_circuit_or_a_503_is_no_proof(healthz):
    server = healthz(
        (200, {**HEALTHY, "key_version": 7, "provider_accepted_version": 7, "circuit": "open"}),
        (503, {**HEALTHY, "key_version": 7, "provider_accepted_version": 7}),
    )
    result = wait_polls(server.url, 3, version="7", require_provider_accepted=True)
    assert (result["outcome"], result["attempts"], server.requests) == ("timeout", 3, 3)
    assert result["status"] == 503


def test_a_provider_rejecting_the_new_key_ends_the_wait_at_once(healthz, poll):
    rejected = {"version": 7, "result": "rejected", "code": "ERROR_KEY_DOES_NOT_EXIST"}
    server = healthz(
        (503, {**HEALTHY, "key_version": 7, "provider_check": rejected}),
    )
    result = poll(url=server.url, version="7", require_provider_accepted=True, timeout=30)
    assert (result["outcome"], result["attempts"]) == ("rejected", 1)
    assert result["json"]["provider_check"]["code"] == "ERROR_KEY_DOES_NOT_EXIST"


def test_a_rejection_of_another_version_does_not_end_the_wait(healthz, poll):
    old = {"version": 6, "result": "rejected"}
    server = healthz(
        (503, {**HEALTHY, "key_version": 7, "provider_check": old}),
        (200, {**HEALTHY, "key_version": 7, "provider_accepted_version": 7}),
    )
    result = poll(url=server.url, version="7", require_provider_accepted=True)
    assert (result["outcome"], result["attempts"]) == ("ready", 2)


def test_without_a_version_any_key_version_is_ready(healthz, poll):
    server = healthz((503, {"status": "starting"}), (200, {**HEALTHY, "key_version": 1}))
    result = poll(url=server.url)
    assert (result["outcome"], result["attempts"]) == ("ready", 2)


def test_a_worker_that_never_answers_times_out_with_the_reason():
    result = wait_polls("http://127.0.0.1:9/healthz", 2, version="7")
    assert (result["outcome"], result["attempts"]) == ("timeout", 2)
    assert (result["status"], result["json"]) == (0, {})
    assert result["msg"].startswith("no answer at http://127.0.0.1:9/healthz")


def test_an_answer_that_is_no_health_document_is_named(healthz):
    server = healthz((502, b"<html>bad gateway</html>"))
    result = wait_polls(server.url, 1, version="7")
    assert (result["outcome"], result["status"], result["json"]) == ("timeout", 502, {})
    assert "without a health document" in result["msg"]


def test_the_shared_deadline_bounds_the_wait_and_the_last_poll_starts_before_it(monkeypatch):
    """Each host of a fan-out stops at the same deadline, however late it started."""
    now = [1000.0]
    polls = []

    def read(url, timeout):
        polls.append(now[0])
        return 200, {**HEALTHY, "key_version": 6}, "HTTP 200"

    def sleep(seconds):
        now[0] += seconds

    params = {
        "url": "http://127.0.0.1:1/healthz",
        "version": "7",
        "require_provider_accepted": True,
        "deadline": 1010.0,
        "timeout": 999,
        "delay": 1.0,
        "request_timeout": 5,
    }
    monkeypatch.setattr(worker_healthz, "read_health", read)
    result = worker_healthz.wait(params, clock=lambda: now[0], sleep=sleep)
    assert result["outcome"] == "timeout"
    assert polls == [1000.0 + i for i in range(10)]
    assert max(polls) < params["deadline"]


@pytest.mark.parametrize("option", ["delay", "request_timeout"])
def test_a_delay_or_timeout_that_is_not_positive_is_refused(option, capsys, monkeypatch):
    monkeypatch.setattr(basic.AnsibleModule, "_log_invocation", lambda module: None)
    args = {"url": "http://127.0.0.1:1/healthz", option: 0}
    with patch_module_args(args), pytest.raises(SystemExit):
        worker_healthz.main()
    result = json.loads(capsys.readouterr().out)
    assert result["failed"] is True
    assert "must be positive" in result["msg"]
