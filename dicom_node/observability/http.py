"""The HTTP side: /metrics for Prometheus, /healthz and /readyz for
orchestrators.  Bound to loopback unless the config says otherwise."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HealthServer"]

log = logging.getLogger("dicom_node.http")

# name -> check returning None when fine, else what is wrong.
Check = Callable[[], str | None]


class HealthServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 checks: dict[str, Check]) -> None:
        self.registry = registry
        self.checks = checks
        handler = self._handler()
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def start(self) -> None:
        self.thread.start()
        log.info("metrics and health on http://%s:%d", *self.address)

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
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
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

            def _json(self, code: int, body: dict) -> None:
                self._send(code, json.dumps(body).encode(), "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("http: " + fmt, *args)

        return Handler
