"""aiohttp front ends of the emulator: the public protocol port and the JSON admin port."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import socket
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from aiohttp import web

from .core import KEY_RE, Emulator, Endpoints, Options, Reply, key_id, mask_key

log = logging.getLogger("captchaai_emulator")

EMULATOR_KEY: web.AppKey[Emulator] = web.AppKey("emulator", Emulator)

_SERVER_ERROR_PAGE = (
    "<html><head><title>500 Internal Server Error</title></head>"
    "<body><center><h1>500 Internal Server Error</h1></center><hr><center>nginx</center>"
    "</body></html>"
)


def check_loopback(host: str) -> None:
    """The emulator only ever listens on a loopback address."""
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"refusing to listen on {host!r}: loopback addresses only")


# ---------------------------------------------------------------------------
# Public protocol


async def _read_params(request: web.Request) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """Query parameters merged with a urlencoded or multipart body (body wins)."""
    params: dict[str, str] = dict(request.query)
    upload: tuple[str, bytes] | None = None
    if request.method == "POST" and request.can_read_body:
        form = await request.post()
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if name == "file":
                    upload = (value.filename or "", value.file.read())
            elif isinstance(value, str):
                params[name] = value
            else:  # bytes-like value of a multipart part without filename
                params[name] = bytes(value).decode("utf-8", "replace")
    return params, upload


def _json_mode(params: Mapping[str, str]) -> bool:
    return params.get("json", "0").lower() in ("1", "true")


def _respond(reply: Reply, params: Mapping[str, str]) -> web.Response:
    headers = {"Access-Control-Allow-Origin": "*"} if params.get("header_acao") == "1" else None
    if _json_mode(params):
        return web.json_response(reply.as_json(), headers=headers)
    return web.Response(text=reply.plain, content_type="text/plain", headers=headers)


def _fault(emu: Emulator, endpoint: str, params: Mapping[str, str]) -> web.Response | None:
    inj = emu.take_injection(endpoint)
    if inj is not None:
        key = params.get("key", "")
        if key:
            st = emu.stats.get(_kid_if_valid(key) or "")
            if st is not None:
                st.bump("injected")
        if inj.http_status != 200:
            return web.Response(
                status=inj.http_status,
                text=inj.answer or _SERVER_ERROR_PAGE,
                content_type="text/html",
            )
        return _respond(Reply.error(inj.answer), params)
    if emu.random_http_error():
        return web.Response(status=500, text=_SERVER_ERROR_PAGE, content_type="text/html")
    return None


def _kid_if_valid(key: str) -> str | None:
    return key_id(key) if KEY_RE.fullmatch(key) else None


def _remote(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return request.remote or "unknown"


async def handle_in(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    params, upload = await _read_params(request)
    fault = _fault(emu, "in.php", params)
    if fault is not None:
        return fault
    reply = emu.submit(params, _remote(request), upload)
    if reply.status == 0:
        log.debug("in.php %s -> %s", mask_key(params.get("key", "")), reply.request)
    return _respond(reply, params)


async def handle_res(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    params, _ = await _read_params(request)
    fault = _fault(emu, "res.php", params)
    if fault is not None:
        return fault
    reply = emu.result(params, _remote(request))
    return _respond(reply, params)


def build_public_app(emu: Emulator) -> web.Application:
    # base64 of a 1 MiB image plus form overhead
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[EMULATOR_KEY] = emu
    for path, handler in (("/in.php", handle_in), ("/res.php", handle_res)):
        app.router.add_route("GET", path, handler)
        app.router.add_route("POST", path, handler)
    return app


# ---------------------------------------------------------------------------
# Admin API (JSON)


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be JSON"}), content_type="application/json"
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be a JSON object"}),
            content_type="application/json",
        )
    return data


def _key_of(data: Mapping[str, Any]) -> str:
    key = data.get("key")
    if not isinstance(key, str) or not key:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "field 'key' (string) is required"}),
            content_type="application/json",
        )
    return key


async def admin_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def admin_add_key(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    data = await _body(request)
    key = _key_of(data)
    try:
        kid = emu.add_key(key, data.get("balance"), data.get("max_slots"))
    except (ValueError, TypeError) as exc:
        return _bad(str(exc))
    return web.json_response(emu.key_info(key) | {"key_id": kid}, status=201)


async def admin_update_key(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    data = await _body(request)
    key = _key_of(data)
    try:
        emu.update_key(key, data.get("balance"), data.get("max_slots"))
    except KeyError:
        return _bad("no such key", 404)
    except (ValueError, TypeError) as exc:
        return _bad(str(exc))
    return web.json_response(emu.key_info(key))


async def admin_revoke_key(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    key = _key_of(await _body(request))
    try:
        emu.revoke_key(key)
    except KeyError:
        return _bad("no such key", 404)
    return web.json_response(emu.key_info(key))


async def admin_counters(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    if request.method == "GET":
        return web.json_response(emu.all_counters())
    return web.json_response(emu.key_info(_key_of(await _body(request))))


async def admin_tasks(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    return web.json_response({"tasks": emu.task_report(_key_of(await _body(request)))})


async def admin_options(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    if request.method == "POST":
        data = await _body(request)
        try:
            emu.set_options(data)
        except ValueError as exc:
            return _bad(str(exc))
        log.info("options set: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.items())))
    return web.json_response(_options_json(emu.options))


def _options_json(options: Options) -> dict[str, Any]:
    return asdict(options)


async def admin_inject(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    data = await _body(request)
    try:
        emu.inject(
            str(data.get("endpoint", "any")),
            str(data.get("answer", "")),
            int(data.get("count", 1)),
            int(data.get("http_status", 200)),
        )
    except (ValueError, TypeError) as exc:
        return _bad(str(exc))
    if int(data.get("http_status", 200)) == 200 and not data.get("answer"):
        emu.injections.pop()
        return _bad("field 'answer' is required for an HTTP 200 fault")
    return web.json_response({"pending": len(emu.injections)})


async def admin_bans(request: web.Request) -> web.Response:
    return web.json_response({"banned": request.app[EMULATOR_KEY].bans()})


async def admin_reset(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR_KEY]
    emu.reset()
    log.info("reset")
    return web.json_response({"status": "reset"})


def build_admin_app(emu: Emulator) -> web.Application:
    app = web.Application()
    app[EMULATOR_KEY] = emu
    r = app.router
    r.add_get("/health", admin_health)
    r.add_post("/keys", admin_add_key)
    r.add_post("/keys/update", admin_update_key)
    r.add_post("/keys/revoke", admin_revoke_key)
    r.add_get("/counters", admin_counters)
    r.add_post("/counters", admin_counters)
    r.add_post("/tasks", admin_tasks)
    r.add_get("/options", admin_options)
    r.add_post("/options", admin_options)
    r.add_post("/inject", admin_inject)
    r.add_get("/bans", admin_bans)
    r.add_post("/reset", admin_reset)
    return app


# ---------------------------------------------------------------------------
# Running both


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class EmulatorServer(Endpoints):
    """Both ports in the current asyncio loop (``async with EmulatorServer(...) as srv``).

    Port 0 picks a free port; see ``.port`` / ``.admin_port`` after start.
    """

    def __init__(
        self,
        port: int,
        admin_port: int,
        options: Options | None = None,
        host: str = "127.0.0.1",
        emulator: Emulator | None = None,
    ) -> None:
        check_loopback(host)
        self.host = host
        self.port = port
        self.admin_port = admin_port
        self.emulator = emulator or Emulator(options)
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        ports = []
        for app, port in (
            (build_public_app(self.emulator), self.port),
            (build_admin_app(self.emulator), self.admin_port),
        ):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            self._runners.append(runner)
            sock = _listen_socket(self.host, port)
            site = web.SockSite(runner, sock)
            await site.start()
            ports.append(sock.getsockname()[1])
        self.port, self.admin_port = ports

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    async def __aenter__(self) -> EmulatorServer:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_forever(server: EmulatorServer) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        opts = server.emulator.options
        log.info(
            "emulator ready public=%s admin=%s solve_delay=%s time_scale=%g",
            server.url,
            server.admin_url,
            opts.solve_delay,
            opts.time_scale,
        )
        await stop.wait()
        log.info("emulator stopping")
