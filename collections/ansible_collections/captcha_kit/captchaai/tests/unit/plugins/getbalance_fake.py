# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A tiny stand-in for CaptchaAI's ``res.php?action=getbalance`` on a free 127.0.0.1 port.

``GetbalanceFake()`` (a context manager) serves ``POST /res.php`` in a thread: a key in
``accepted`` gets its balance, any other key ``ERROR_KEY_DOES_NOT_EXIST``; JSON when the request
asks ``json=1``, plain text otherwise. ``answer`` overrides everything with
``(http status, body)``; ``requests`` records ``(path, form)`` of every request. Unit tests only.

Import it by its full name, ``ansible_collections.captcha_kit.captchaai.tests.unit.plugins.
getbalance_fake``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


class GetbalanceFake:
    def __init__(self):
        self.accepted = {}  # key -> balance text
        self.answer = None  # (status, body) to send instead of a getbalance answer
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                fake.requests.append((self.path, form))
                status, body = fake.answer or fake.getbalance(self.path, form)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def getbalance(self, path, form):
        if path != "/res.php" or form.get("action") != "getbalance":
            return 404, "not found"
        balance = self.accepted.get(form.get("key", ""))
        status, request = (1, balance) if balance is not None else (0, "ERROR_KEY_DOES_NOT_EXIST")
        if form.get("json") == "1":
            return 200, json.dumps({"status": status, "request": request})
        return 200, request

    def __enter__(self):
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
