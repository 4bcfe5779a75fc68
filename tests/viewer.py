"""OHIF in headless Chromium against Orthanc's DICOMweb plugin, for tests/test_viewer.py.

- ``ohif_dist()``: the prebuilt OHIF viewer (npm ``@ohif/app``), fetched with
  ``npm pack`` into ``.cache/ohif/`` (ignored by git) on first use;
- ``OhifServer``: a static server for it, with an ``index.html`` fallback, our
  ``app-config.js``, and ``/dicom-web`` proxied to Orthanc;
- ``Browser``: Chromium driven over the DevTools protocol on a pipe
  (``--remote-debugging-pipe``), so no websocket client or npm driver is needed.
"""

from __future__ import annotations

import base64
import fcntl
import http.server
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

OHIF_VERSION = "3.13.2"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "ohif"


def ohif_dist(cache: Path = CACHE, version: str = OHIF_VERSION) -> Path:
    """The OHIF static dist folder, fetched and unpacked once (``make ohif`` does the same)."""
    dist = cache / f"ohif-app-{version}" / "dist"
    if (dist / "index.html").exists():
        return dist
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / f"ohif-app-{version}.tgz"
    if not tgz.exists():
        subprocess.run(["npm", "pack", "--silent", f"@ohif/app@{version}", "--pack-destination", str(cache)],
                       check=True, capture_output=True, timeout=600)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(tgz) as tar:  # only the dist, without source maps (~40 MB)
        members = [m for m in tar.getmembers()
                   if m.name.startswith("package/dist/") and not m.name.endswith(".map")]
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(dist.parent, ignore_errors=True)
    (tmp / "package").rename(dist.parent)
    tmp.rmdir()
    return dist


APP_CONFIG = """window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  customizationService: {},
  investigationalUseDialog: { option: 'never' },
  disableConfirmationPrompts: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumberOfWebWorkers: 2,
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test PACS)',
      name: 'orthanc',
      wadoUriRoot: window.location.origin + '/dicom-web',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false,
      supportsReject: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""

MIME = {".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css", ".html": "text/html",
        ".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png", ".woff2": "font/woff2",
        ".ico": "image/x-icon", ".jsonc": "application/json"}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: OhifServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet; failures show in the browser log
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/"):
            return self._proxy()
        if path == "/app-config.js":
            return self._send(200, APP_CONFIG.encode(), "text/javascript")
        if path in ("/sw.js", "/init-service-worker.js"):  # no service worker: nothing cached between tests
            return self._send(200, b"", "text/javascript")
        file = (self.server.dist / path.lstrip("/")).resolve()
        if not file.is_file() or self.server.dist not in file.parents:
            file = self.server.dist / "index.html"
        self._send(200, file.read_bytes(), MIME.get(file.suffix, "application/octet-stream"))

    def _proxy(self) -> None:
        url = self.server.dicomweb_url + self.path[len("/dicom-web"):]
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as rsp:
                self._send(rsp.status, rsp.read(), rsp.headers.get("Content-Type", "application/octet-stream"))
        except urllib.error.HTTPError as exc:
            self._send(exc.code, exc.read(), exc.headers.get("Content-Type", "text/plain"))

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class OhifServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, dicomweb_url: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.dicomweb_url = dicomweb_url.rstrip("/")
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> OhifServer:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium with one page, driven over CDP on fds 3/4."""

    def __init__(self, workdir: Path, width: int = 1280, height: int = 800) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = (workdir / "chromium.log").open("ab")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Above 3/4, so that the dup2s in the child cannot clobber them.
        to_child_r, from_child_w = (_high_fd(fd) for fd in (to_child_r, from_child_w))
        args = ["--headless=new", "--no-sandbox", "--remote-debugging-pipe", f"--user-data-dir={workdir / 'profile'}",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", f"--window-size={width},{height}",
                "--force-device-scale-factor=1", "about:blank"]

        def pipe_fds() -> None:  # in the child: the pipe ends at the fds Chromium reads and writes
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        # close_fds=False keeps 3 and 4; every other fd Python opened is non-inheritable.
        self.proc = subprocess.Popen([shutil.which("chromium") or "chromium", *args],
                                     preexec_fn=pipe_fds,  # noqa: PLW1509 (it only calls dup2)
                                     close_fds=False, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self.console: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        [target] = [t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page"][:1]
        self.session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._from_child, 1 << 20):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                elif msg.get("method") == "Runtime.consoleAPICalled":
                    p = msg["params"]
                    text = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
                    self.console.append(f"{p['type']}: " + (text if len(text) < 1200 else
                                                           text[:300] + " [...] " + text[-900:]))
                elif msg.get("method") == "Runtime.exceptionThrown":
                    self.console.append("exception: " + json.dumps(msg["params"]["exceptionDetails"])[:500])
        with self._cond:
            self._cond.notify_all()

    def send(self, method: str, *, session: str | None = None, timeout: float = 60, **params: Any) -> dict:
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                alive = self.proc.poll() is None
                if not (alive and self._cond.wait(max(0.0, deadline - time.monotonic()))) \
                        and mid not in self._replies:
                    raise RuntimeError(f"no CDP reply to {method} (chromium rc {self.proc.poll()})")
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"CDP {method}: {reply['error']}")
        return reply.get("result", {})

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict:
        return self.send(method, session=self.session, timeout=timeout, **params)

    def before_load(self, script: str) -> None:
        self.call("Page.addScriptToEvaluateOnNewDocument", source=script)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str, timeout: float = 60) -> Any:
        r = self.call("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expression[:80]!r}: {r['exceptionDetails'].get('text')} "
                               f"{r['exceptionDetails'].get('exception', {}).get('description', '')}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 60, what: str | None = None) -> Any:
        """Poll a JS expression until truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what or expression}; "
                                     f"console tail: {self.console[-8:]}")
            time.sleep(0.25)

    def click(self, element: str, count: int = 1, timeout: float = 30) -> None:
        """A real mouse click (``count`` 2: double-click) at the centre of the element
        that the JS expression ``element`` gives, once it is there."""
        box = self.wait(f"(e => e && (r => r.width && [r.x + r.width / 2, r.y + r.height / 2])"
                        f"(e.getBoundingClientRect()))({element})", timeout, what=element)
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=n)

    def screenshot(self, path: Path | None = None, clip: dict | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        png = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        if path is not None:
            path.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except RuntimeError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()


def skip_tour_script() -> str:
    """Run before OHIF loads: mark its onboarding tour as shown."""
    return "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


def coloured_fraction(png: bytes, box: tuple[int, int, int, int] | None = None, spread: int = 80) -> float:
    """The fraction of pixels in ``box`` (left, top, right, bottom) whose channels differ by
    more than ``spread``: overlays and colour maps, never a greyscale image."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").crop(box) if box else
                     Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > spread).mean())


def save_small_png(png: bytes, path: Path, width: int = 1024) -> None:
    """A README-sized copy of a screenshot (about 100-300 kB): scaled to ``width``, true
    colour (a palette would band the heat maps and the SEG's blended fill)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
