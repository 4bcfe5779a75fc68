"""The HTTP side: /metrics for Prometheus, /healthz and /readyz for
orchestrators, and the status page with its JSON API (observability/status.py).
Bound to loopback unless the config says otherwise."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dicom_node.observability.status import Response, StatusPage

__all__ = ["HealthServer"]

log = logging.getLogger("dicom_node.http")

# name -> check returning None when fine, else what is wrong.
Check = Callable[[], str | None]
# Largest POST body read (the actions take a form field or two).
_MAX_BODY = 64 * 1024
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'",
}


class HealthServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 checks: dict[str, Check], status: StatusPage | None = None) -> None:
        self.registry = registry
        self.checks = checks
        self.status = status
        handler = self._handler()
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()
        host, port = self.address
        if self.status is not None and self.status.settings.status_page:
            log.info("status page on http://%s:%d%s/, metrics and health on http://%s:%d",
                     host, port, self.status.prefix, host, port)
        else:
            log.info("metrics and health on http://%s:%d", host, port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        results = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # noqa: BLE001 - a failing check is a finding, not a crash
                problem = f"{type(exc).__name__}: {exc}"
            results[name] = problem or "ok"
        return all(v == "ok" for v in results.values()), results

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _route(self) -> tuple[str, str]:
                path, _, query = self.path.partition("?")
                if outer.status is not None:
                    path = outer.status.strip_prefix(path)
                return path, query

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path, query = self._route()
                status = outer.status
                if status is not None and status.handles(path):
                    try:
                        self._reply(status.get(path, query))
                    except Exception:  # noqa: BLE001 - a broken page must not kill the port
                        log.exception("status page failed on %s", path)
                        self._json(500, {"error": "status page failed; see the node's log"})
                    return
                if path == "/metrics":
                    self._send(200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._json(200, {"status": "alive"})
                elif path == "/readyz":
                    ready, checks = outer.readiness()
                    self._json(200 if ready else 503,
                               {"status": "ready" if ready else "not ready", "checks": checks})
                else:
                    self._json(404, {"error": f"no such endpoint {path}"})

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                path, _ = self._route()
                status = outer.status
                if status is None or not status.handles(path):
                    self._json(404 if path not in ("/metrics", "/healthz", "/readyz") else 405,
                               {"error": f"no POST on {path}"})
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= _MAX_BODY:
                    self._json(413, {"error": "request body too large or malformed"})
                    return
                body = self.rfile.read(length) if length else b""
                try:
                    self._reply(status.post(path, self.headers, body))
                except Exception:  # noqa: BLE001 - an action that fails answers 500, the port stays
                    log.exception("status action failed on %s", path)
                    self._json(500, {"error": "action failed; see the node's log"})

            def _reply(self, rsp: Response) -> None:
                self._send(rsp.code, rsp.body, rsp.ctype, {**_SECURITY_HEADERS, **rsp.headers})

            def _json(self, code: int, body: dict[str, Any]) -> None:
                self._send(code, json.dumps(body).encode(), "application/json")

            def _send(self, code: int, body: bytes, ctype: str,
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("http: " + fmt, *args)

        return Handler
