#!/usr/bin/python3
"""Wait until a captcha-solver worker reports its env and a key version on /healthz.

Usage: wait_healthy.py HOST PORT ENV SERVICE TIMEOUT
Prints one JSON object: {"ready": bool, "health": {...last /healthz...}, "state": "..."}.
Stops early when systemd marks the service failed (e.g. exit 78: no restart will follow).
Part of the captcha_worker role; runs on the worker host with the system Python.
"""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request


def health(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback http
            return json.load(resp)
    except urllib.error.HTTPError as exc:  # 503 still carries the JSON document
        try:
            return json.load(exc)
        except ValueError:
            return {"error": f"HTTP {exc.code} without a health document"}
    except OSError as exc:
        return {"error": f"no answer at {url}: {exc}"}


def main():
    host, port, env, service, timeout = sys.argv[1:6]
    url = f"http://{host}:{port}/healthz"
    deadline = time.monotonic() + float(timeout)
    own = None  # the worker's own last answer: kept while it restarts (exit 75, no key yet)
    while True:
        last = health(url)
        if last.get("env") == env:
            own = last
            if last.get("key_version") is not None:
                print(json.dumps({"ready": True, "health": last, "state": "active"}))
                return
        state = subprocess.run(
            ["systemctl", "is-active", service], capture_output=True, text=True, check=False
        ).stdout.strip()
        if state == "failed" or time.monotonic() > deadline:
            print(json.dumps({"ready": False, "health": own or last, "state": state}))
            return
        time.sleep(1)


if __name__ == "__main__":
    main()
