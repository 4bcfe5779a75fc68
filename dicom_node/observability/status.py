"""The status page and its JSON API, on the node's HTTP port.

Server-rendered HTML with a little CSS, no JavaScript: what came in (calling
AE, series, instance counts, route or unrouted reason), the jobs, the outbox
per destination, disk, models and providers, and the readiness checks.  It
reads the store, which holds UIDs and AE titles and no patient names or IDs;
every value is HTML-escaped.

GET is read-only and open (the HTTP port stays on loopback unless the config
says otherwise).  POST actions (retry a job, release or discard a held one,
revive dead letters, echo a destination) need ``node.http.token`` (sent as
``Authorization: Bearer``, or as a ``token`` form field from the page) or
``node.http.username``/``password`` (basic auth); without either every POST
answers 403.

Everything is served under ``node.http.path_prefix`` so the page can sit
behind a reverse proxy; requests are accepted with the prefix or without it
(a proxy that strips it), links always carry it.
"""

from __future__ import annotations

import base64
import hmac
import html
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from dicom_node import __version__
from dicom_node.config import (
    Config,
    Destination,
    DicomDestination,
    FolderDestination,
    SenderDestination,
)
from dicom_node.errors import JobStateError
from dicom_node.store.db import JobState, OutboxState, Store
from dicom_node.store.layout import DataDir
from dicom_node.store.views import StoreViews
from dicom_node.store.retention import remove_result_files

__all__ = ["Response", "StatusPage"]

log = logging.getLogger("dicom_node.status")
audit = logging.getLogger("dicom_node.audit")

_LIMIT_MAX = 500
_JOB_STATES = [s.value for s in JobState]


@dataclass
class Response:
    code: int
    body: bytes
    ctype: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _json(code: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(code, json.dumps(body, indent=1, default=str).encode(),
                    "application/json", headers or {})


# -- the page ----------------------------------------------------------------------------

@dataclass
class StatusPage:
    config: Config
    store: Store
    readiness: Callable[[], tuple[bool, dict[str, str]]]
    below_watermark: Callable[[], bool] = lambda: False
    registry: Any = None  # the exposition registry, for the providers loaded by workers
    echo: Callable[[str], tuple[bool, str]] | None = None
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.settings = self.config.node.http
        self.prefix = self.settings.path_prefix
        self.data = StoreViews(DataDir.of(self.config).db)
        if self.echo is None:
            self.echo = self._echo

    # -- dispatch ----------------------------------------------------------------------

    def strip_prefix(self, path: str) -> str:
        if self.prefix and (path == self.prefix or path.startswith(self.prefix + "/")):
            return path[len(self.prefix):] or "/"
        return path

    def handles(self, path: str) -> bool:
        return self.settings.status_page and (path in ("/", "/index.html") or path == "/api"
                                              or path.startswith("/api/"))

    def get(self, path: str, query: str) -> Response:
        params = parse_qs(query)
        try:
            if path in ("/", "/index.html"):
                return Response(200, self.render(params).encode(), "text/html; charset=utf-8")
            return _json(200, self._api_get(path, params))
        except HttpError as exc:
            return _json(exc.code, {"error": exc.message})

    def post(self, path: str, headers: Any, body: bytes) -> Response:
        form_body = (headers.get("Content-Type") or "").startswith("application/x-www-form-urlencoded")
        form = parse_qs(body.decode("utf-8", "replace")) if form_body else {}
        # A browser's form post goes back to the page; any other client gets JSON.
        is_form = form_body and "text/html" in (headers.get("Accept") or "")
        try:
            who = self._authorize(headers, form)
            result = self._action(path, form, who)
        except HttpError as exc:
            if is_form and exc.code not in (401, 403):
                return self._back(f"error: {exc.message}")
            extra = ({"WWW-Authenticate": 'Basic realm="dicom-node", charset="UTF-8"'}
                     if exc.code == 401 and self.settings.username else {})
            return _json(exc.code, {"error": exc.message}, extra)
        if is_form:
            return self._back(result["message"])
        return _json(200, result)

    def _back(self, message: str) -> Response:
        """After a form POST: back to the page, which shows the message."""
        location = f"{self.prefix}/?msg={quote(message[:300])}"
        return Response(303, b"", "text/plain", {"Location": location})

    # -- authorization ------------------------------------------------------------------

    def _authorize(self, headers: Any, form: dict[str, Any]) -> str:
        s = self.settings
        if not s.actions_enabled:
            raise HttpError(403, "actions are off: set node.http.token or node.http.username "
                                 "and password to enable them")
        # A page on another site cannot make a logged-in browser act here.
        # Behind a reverse proxy the browser's host is in X-Forwarded-Host
        # when the proxy rewrites Host.
        origin = headers.get("Origin")
        hosts = {h.strip() for h in (headers.get("Host") or "",
                                     *(headers.get("X-Forwarded-Host") or "").split(",")) if h.strip()}
        if headers.get("Sec-Fetch-Site") == "cross-site" or (
                origin and hosts and urlsplit(origin).netloc not in hosts):
            raise HttpError(403, "cross-site request refused")
        auth = headers.get("Authorization") or ""
        scheme, _, value = auth.partition(" ")
        if s.token is not None:
            offered = value.strip() if scheme.lower() == "bearer" else (form.get("token") or [""])[0]
            if offered and hmac.compare_digest(offered.encode(), s.token.get_secret_value().encode()):
                return "token"
        if s.username is not None and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if (hmac.compare_digest(user.encode(), s.username.encode())
                    and s.password is not None
                    and hmac.compare_digest(password.encode(), s.password.get_secret_value().encode())):
                return user
        raise HttpError(401, "authorization required (Bearer token or basic auth)")

    # -- actions ------------------------------------------------------------------------

    def _action(self, path: str, form: dict[str, Any], who: str) -> dict[str, Any]:
        parts = [p for p in path.split("/") if p]
        # /api/jobs/<id>/<retry|release|discard>
        if len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] in ("retry", "release", "discard"):
            job_id = _int(parts[2], "job id")
            return getattr(self, f"_{parts[3]}")(job_id, who)
        # /api/outbox/retry[?destination] or /api/destinations/<name>/retry
        if parts == ["api", "outbox", "retry"]:
            dest = (form.get("destination") or [None])[0]
            return self._revive(dest, who)
        if len(parts) == 4 and parts[:2] == ["api", "destinations"] and parts[3] in ("echo", "retry"):
            name = parts[2]
            self._destination(name)
            return self._revive(name, who) if parts[3] == "retry" else self._echo_action(name, who)
        raise HttpError(404, f"no such action {path}")

    def _retry(self, job_id: int, who: str) -> dict[str, Any]:
        try:
            ok = self.store.requeue_job(job_id)
        except JobStateError as exc:
            raise HttpError(409, str(exc)) from exc
        if not ok:
            raise HttpError(409, f"job {job_id} not found or still queued/running")
        audit.warning("job %d queued again by operator %s (status page)", job_id, who)
        return {"ok": True, "message": f"job {job_id} queued again"}

    def _release(self, job_id: int, who: str) -> dict[str, Any]:
        try:
            items = self.store.release_job(job_id)
        except JobStateError as exc:
            raise HttpError(409, str(exc)) from exc
        audit.warning("job %d released by operator %s (status page); %d result objects queued",
                      job_id, who, len(items))
        return {"ok": True, "message": f"job {job_id} released: {len(items)} outbox items queued to send"}

    def _discard(self, job_id: int, who: str) -> dict[str, Any]:
        try:
            items = self.store.discard_job(job_id)
        except JobStateError as exc:
            raise HttpError(409, str(exc)) from exc
        removed = remove_result_files(items)
        audit.warning("job %d discarded by operator %s (status page); %d result files deleted unsent",
                      job_id, who, removed)
        return {"ok": True, "message": f"job {job_id} discarded: {removed} result files deleted, nothing sent"}

    def _revive(self, destination: str | None, who: str) -> dict[str, Any]:
        if destination:
            self._destination(destination)
        n = self.store.retry_dead(destination)
        audit.warning("%d dead letters%s queued again by operator %s (status page)", n,
                      f" to {destination}" if destination else "", who)
        return {"ok": True, "revived": n,
                "message": f"{n} dead letters queued again" + (f" to {destination}" if destination else "")}

    def _echo_action(self, name: str, who: str) -> dict[str, Any]:
        ok, detail = (self.echo or self._echo)(name)
        log.info("echo of destination %s by %s: %s", name, who, detail)
        return {"ok": ok, "destination": name, "message": f"echo {name}: {detail}"}

    def _destination(self, name: str) -> Destination:
        try:
            return self.config.destination(name)
        except KeyError:
            raise HttpError(404, f"no destination {name!r}") from None

    def _echo(self, name: str) -> tuple[bool, str]:
        dest = self._destination(name)
        if isinstance(dest, DicomDestination):
            from dicom_node.send.echo import echo_peer

            result = echo_peer(self.config.peer(dest.peer), calling_ae=self.config.node.ae_title)
            return result.ok, f"{result.detail} in {result.seconds:.2f} s"
        if isinstance(dest, FolderDestination):
            folder = self.config.folder_path(dest)
            ok = folder.is_dir() and _writable(folder)
            return ok, f"folder {folder} " + ("is writable" if ok else "is missing or not writable")
        if dest.kind == "dicomweb":
            from dicom_node.send.dicomweb import echo_dicomweb

            return echo_dicomweb(dest)
        return False, "a sender destination has no fixed peer: results go back to each study's caller"

    # -- API reads --------------------------------------------------------------------------

    def _api_get(self, path: str, params: dict[str, Any]) -> Any:
        limit = _int((params.get("limit") or ["50"])[0], "limit")
        if not 1 <= limit <= _LIMIT_MAX:
            raise HttpError(400, f"limit must be 1..{_LIMIT_MAX}")
        parts = [p for p in path.split("/") if p]
        if parts in (["api"], ["api", "status"]):
            return self.snapshot(limit)
        if parts == ["api", "jobs"]:
            return {"jobs": self.data.jobs(self._state(params), limit)}
        if len(parts) == 3 and parts[:2] == ["api", "jobs"]:
            job = self.data.job(_int(parts[2], "job id"))
            if job is None:
                raise HttpError(404, f"no job {parts[2]}")
            return job
        if parts == ["api", "series"]:
            unrouted = (params.get("unrouted") or ["0"])[0] in ("1", "true", "yes")
            return {"series": self.data.series(limit, unrouted)}
        if parts == ["api", "outbox"]:
            return {"outbox": self.data.outbox()}
        if parts == ["api", "checks"]:
            ready, checks = self.readiness()
            return {"ready": ready, "checks": checks}
        if parts == ["api", "models"]:
            return {"models": self.models()}
        if parts == ["api", "disk"]:
            return self.disk()
        raise HttpError(404, f"no such endpoint {self.prefix}{path}")

    def _state(self, params: dict[str, Any]) -> str | None:
        state = (params.get("state") or [None])[0]
        if state and state not in _JOB_STATES:
            raise HttpError(400, f"unknown job state {state!r}; one of {', '.join(_JOB_STATES)}")
        return state or None

    def disk(self) -> dict[str, Any]:
        data_dir = self.config.data_dir
        free: int | None
        total: int | None
        try:
            usage = shutil.disk_usage(data_dir)
            free, total = usage.free, usage.total
        except OSError:
            free = total = None
        return {"data_dir": str(data_dir), "free_bytes": free, "total_bytes": total,
                "watermark_bytes": self.config.node.min_free_bytes,
                "below_watermark": bool(self.below_watermark())}

    def models(self, checks: dict[str, str] | None = None) -> list[dict[str, Any]]:
        from dicom_node.infer.engine import ModelRegistry

        loaded: dict[str, set[str]] = {}
        if self.registry is not None:
            try:
                for family in self.registry.collect():
                    if family.name == "dicom_node_model_info":
                        for s in family.samples:
                            if s.value:
                                loaded.setdefault(s.labels.get("model", ""), set()).add(
                                    s.labels.get("provider", ""))
            except Exception:
                log.debug("status page: cannot read the loaded models from the metrics", exc_info=True)
        if checks is None:
            _, checks = self.readiness()
        inf = self.config.inference
        try:
            registry = ModelRegistry.from_settings(self.config.models_dir, inf)
        except Exception:  # noqa: BLE001
            registry = None
        out = []
        for name in sorted({r.model for r in self.config.routes}):
            version = task = None
            if registry is not None:
                try:
                    manifest = registry.manifest(name)
                    version, task = manifest.version, manifest.task
                except Exception:
                    log.debug("status page: no manifest for model %s", name, exc_info=True)
            out.append({"model": name, "version": version, "task": task,
                        "backend": inf.backend_of(name),
                        "routes": [r.name for r in self.config.routes if r.model == name],
                        "providers_configured": list(inf.providers),
                        "providers_loaded": sorted(loaded.get(name, ())),
                        "check": checks.get(f"model {name}", "ok")})
        return out

    def destinations(self) -> list[dict[str, Any]]:
        out = []
        for dest in self.config.destinations:
            row = {"name": dest.name, "kind": dest.kind}
            if isinstance(dest, DicomDestination):
                peer = self.config.peer(dest.peer)
                row["target"] = f"{peer.ae_title}@{peer.host}:{peer.port}" + (" (TLS)" if peer.tls else "")
            elif isinstance(dest, FolderDestination):
                row["target"] = str(self.config.folder_path(dest))
            elif isinstance(dest, SenderDestination):
                row["target"] = "the calling AE of each study"
            elif dest.kind == "dicomweb":
                row["target"] = f"STOW-RS {dest.url}/studies"
            out.append(row)
        return out

    def snapshot(self, limit: int = 50) -> dict[str, Any]:
        ready, checks = self.readiness()
        outbox = self.data.outbox()
        dests = self.destinations()
        for d in dests:
            d.update(outbox.get(d["name"], {"counts": {s.value: 0 for s in OutboxState},
                                            "last_error": None, "last_sent_at": None}))
        node = self.config.node
        return {
            "node": {"ae_title": node.ae_title, "dicom": f"{node.host}:{node.port}",
                     "version": __version__, "started_at": self.started_at, "now": time.time(),
                     "actions_enabled": self.settings.actions_enabled},
            "ready": ready, "checks": checks, "disk": self.disk(), "models": self.models(checks),
            "routes": [{"name": r.name, "pipeline": r.pipeline, "model": r.model,
                        "destinations": r.destinations, "group_by": r.group_by}
                       for r in self.config.routes],
            "destinations": dests, "job_counts": self.data.job_counts(),
            "jobs": self.data.jobs(limit=limit), "series": self.data.series(limit),
        }

    # -- HTML -------------------------------------------------------------------------------

    def render(self, params: dict[str, Any]) -> str:
        limit = 50
        snap = self.snapshot(limit)
        state = None
        try:
            state = self._state(params)
        except HttpError:
            pass
        jobs = self.data.jobs(state, limit) if state else snap["jobs"]
        msg = (params.get("msg") or [""])[0][:300]
        act = self.settings.actions_enabled
        token_field = ('<input type="password" name="token" placeholder="token" required '
                       'autocomplete="current-password">' if act and self.settings.token is not None
                       and self.settings.username is None else "")
        p = self.prefix

        def form(*buttons: tuple[str, str, bool]) -> str:
            """One form per row (one token field), a button per action:
            (path, label, danger), each posting to its own path."""
            if not act or not buttons:
                return ""
            html_buttons = "".join(
                f'<button type="submit" formaction="{_e(p + path)}"{_DANGER if danger else ""}>'
                f'{_e(label)}</button>' for path, label, danger in buttons)
            return (f'<form method="post" action="{_e(p + buttons[0][0])}">{token_field}'
                    f'{html_buttons}</form>')

        node = snap["node"]
        parts = [f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="15">
<title>dicom-node {_e(node['ae_title'])}</title>
<style>{_CSS}</style></head><body>
<header><h1>dicom-node <span class="ae">{_e(node['ae_title'])}</span></h1>
<span class="badge {'ok' if snap['ready'] else 'bad'}" id="readiness">{'READY' if snap['ready'] else 'NOT READY'}</span>
<span class="meta">DICOM {_e(node['dicom'])} &middot; version {_e(node['version'])} &middot;
up since {_e(_when(node['started_at']))} &middot; page at {_e(_when(node['now']))}
&middot; <a href="{_e(p)}/api/status">JSON</a> &middot; <a href="{_e(p)}/metrics">metrics</a></span></header>
"""]
        if msg:
            parts.append(f'<p class="flash" id="message">{_e(msg)}</p>')
        held = snap["job_counts"].get("held", 0)
        if held:
            parts.append(f'<p class="heldnote" id="held">{held} job{"s" if held > 1 else ""} held for review: '
                         f'results written, not sent; <a href="{_e(p)}/?state=held">release or discard</a>.</p>')
        if not act:
            parts.append('<p class="note">Read-only: actions need node.http.token or '
                         'node.http.username/password.</p>')
        # readiness checks + disk
        rows = "".join(f'<tr class="{"ok" if v == "ok" else "bad"}"><td>{_e(k)}</td><td>{_e(v)}</td></tr>'
                       for k, v in snap["checks"].items())
        disk = snap["disk"]
        free = disk["free_bytes"]
        pct = (100 * free / disk["total_bytes"]) if free is not None and disk["total_bytes"] else None
        parts.append(f"""<div class="grid"><section id="checks"><h2>Readiness</h2>
<table><thead><tr><th>check</th><th>result</th></tr></thead><tbody>{rows}</tbody></table></section>
<section id="disk"><h2>Disk</h2><table><tbody>
<tr><th>data dir</th><td class="mono">{_e(disk['data_dir'])}</td></tr>
<tr><th>free</th><td class="{'bad' if disk['below_watermark'] else 'ok'}">{_e(_bytes(free))}{f' ({pct:.0f} %)' if pct is not None else ''} of {_e(_bytes(disk['total_bytes']))}</td></tr>
<tr><th>watermark</th><td>{_e(_bytes(disk['watermark_bytes']))}: below it new instances are refused (0xA700)</td></tr>
</tbody></table></section></div>
""")
        # models
        rows = "".join(
            f"<tr><td>{_e(m['model'])}</td><td>{_e(m['version'] or '?')}</td><td>{_e(m['backend'])}</td>"
            f"<td>{_e(', '.join(m['routes']))}</td>"
            f"<td>{_e(', '.join(m['providers_loaded']) or 'not loaded yet')}</td>"
            f"<td class=\"small\">{_e(', '.join(m['providers_configured']))}</td>"
            f"<td class=\"{'ok' if m['check'] == 'ok' else 'bad'}\">{_e(m['check'])}</td></tr>"
            for m in snap["models"])
        parts.append(f"""<section id="models"><h2>Models</h2><table><thead><tr><th>model</th><th>version</th>
<th>backend</th><th>routes</th><th>provider in use</th><th>providers configured</th><th>check</th></tr></thead>
<tbody>{rows}</tbody></table></section>
""")
        # outbox per destination
        trs: list[str] = []
        for d in snap["destinations"]:
            c = d["counts"]
            name = quote(d["name"], safe="")
            buttons = [(f"/api/destinations/{name}/echo", "echo", False)]
            if c.get("dead"):
                buttons.append((f"/api/destinations/{name}/retry", f"revive {c['dead']} dead", False))
            actions = form(*buttons)
            trs.append(
                f"<tr><td>{_e(d['name'])}</td><td>{_e(d['kind'])}</td><td class=\"mono\">{_e(d['target'])}</td>"
                f"<td class=\"num\">{c.get('pending', 0)}</td><td class=\"num\">{c.get('sent', 0)}</td>"
                f"<td class=\"num {'bad' if c.get('dead') else ''}\">{c.get('dead', 0)}</td>"
                f"<td class=\"num\">{c.get('held', 0)}</td>"
                f"<td>{_e(_when(d['last_sent_at']))}</td><td class=\"err\">{_e(d['last_error'] or '')}</td>"
                f"<td class=\"actions\">{actions}</td></tr>")
        parts.append(f"""<section id="outbox"><h2>Outbox</h2><table><thead><tr><th>destination</th><th>kind</th>
<th>target</th><th>pending</th><th>sent</th><th>dead</th><th>held</th><th>last sent</th><th>last error</th><th></th></tr>
</thead><tbody>{''.join(trs)}</tbody></table></section>
""")
        # jobs
        counts = snap["job_counts"]
        filters = " ".join(
            f'<a href="{_e(p)}/?state={s}" class="{"sel" if s == state else ""}">{s} {counts.get(s, 0)}</a>'
            for s in _JOB_STATES) + f' <a href="{_e(p)}/">all</a>'
        trs = []
        for j in jobs:
            actions = ""
            if j["state"] == "held":
                actions = form((f"/api/jobs/{j['id']}/release", "release", False),
                               (f"/api/jobs/{j['id']}/discard", "discard", True))
            elif j["state"] in ("failed", "done", "skipped", "discarded"):
                actions = form((f"/api/jobs/{j['id']}/retry", "retry", False))
            series = "<br>".join(_e(u) for u in j["series_uids"][:3]) + (
                f"<br>+{len(j['series_uids']) - 3} more" if len(j["series_uids"]) > 3 else "")
            trs.append(
                f'<tr id="job-{j["id"]}" class="job state-{_e(j["state"])}"><td class="num">'
                f'<a href="{_e(p)}/api/jobs/{j["id"]}">{j["id"]}</a></td>'
                f'<td><span class="st {_e(j["state"])}">{_e(j["state"])}</span></td>'
                f"<td>{_e(j['route'])}</td><td>{_e(j['pipeline'])}</td><td>{_e(j['model'])}</td>"
                f"<td>{_e(j['calling_ae'])}</td><td class=\"t\">{_e(_when(j['created_at']))}</td>"
                f"<td class=\"num\">{_e(_dur(j['duration_s']))}</td><td>{_e(j['outcome'])}</td>"
                f"<td class=\"err\">{_e(j['reason'] or '')}</td><td class=\"mono small\">{series}</td>"
                f"<td class=\"actions\">{actions}</td></tr>")
        parts.append(f"""<section id="jobs"><h2>Jobs</h2><p class="filters">{filters}</p>
<table><thead><tr><th>id</th><th>state</th><th>route</th><th>pipeline</th><th>model</th><th>calling AE</th>
<th>queued</th><th>duration</th><th>outcome</th><th>reason</th><th>series</th><th></th></tr></thead>
<tbody>{''.join(trs) or '<tr><td colspan="12">no jobs</td></tr>'}</tbody></table></section>
""")
        # series
        trs = []
        for s in snap["series"]:
            count = str(s["instance_count"]) + (f" / {s['expected_count']}" if s["expected_count"] else "")
            routed = (f'<td>{_e(s["route"])}</td>' if s["route"] else
                      f'<td class="warn">unrouted: {_e(s["unrouted_reason"] or "")}</td>'
                      if s["state"] == "complete" else '<td class="note">waiting for the series to complete</td>')
            trs.append(
                f'<tr class="series"><td class="t">{_e(_when(s["last_at"]))}</td><td>{_e(s["calling_ae"])}</td>'
                f"<td>{_e(s['called_ae'])}</td><td>{_e(s['modality'])}</td>"
                f"<td class=\"mono small\">{_e(s['series_uid'])}</td><td class=\"num\">{_e(count)}</td>"
                f"<td>{_e(s['state'])}</td>{routed}</tr>")
        parts.append(f"""<section id="series"><h2>Received series</h2>
<table><thead><tr><th>last instance</th><th>calling AE</th><th>called AE</th><th>modality</th>
<th>series UID</th><th>instances</th><th>state</th><th>route</th></tr></thead>
<tbody>{''.join(trs) or '<tr><td colspan="8">nothing received yet</td></tr>'}</tbody></table></section>
<footer>No patient names or IDs are shown: the node's store keeps UIDs and AE titles only.
Refreshes every 15 s.</footer></body></html>
""")
        return "".join(parts)


_DANGER = ' class="danger"'


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{what} must be a number, not {value!r}") from None


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _bytes(size: int | None) -> str:
    if size is None:
        return "?"
    n = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;padding:0 18px 24px;
color:#1d2433;background:#f5f6f8}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:12px;padding:12px 0;border-bottom:1px solid #d7dbe2}
h1{font-size:20px;margin:0}h1 .ae{color:#2456a6}h2{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6475;font-size:12px}.badge{font-weight:700;padding:2px 10px;border-radius:10px;color:#fff}
.badge.ok{background:#1f8a4c}.badge.bad{background:#c0392b}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d7dbe2}
th,td{padding:4px 8px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600;font-size:12px;color:#3b4456}
td.num{text-align:right;font-variant-numeric:tabular-nums}.mono{font-family:"DejaVu Sans Mono",monospace}
.small{font-size:11px}.err{color:#a23a2f;font-size:12px;max-width:28em}
tr.ok td:last-child,td.ok{color:#1f8a4c}tr.bad td,td.bad{color:#c0392b;font-weight:600}.warn{color:#a66a00}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.st{padding:1px 6px;border-radius:8px;font-size:12px;background:#e3e7ee}
.st.done{background:#d5f0df}.st.failed{background:#f8d7d3}.st.held{background:#fde9b8}
.st.running{background:#d6e4fb}.st.discarded,.st.skipped{background:#e6e6e6}
.actions form{display:flex;gap:4px;align-items:center;margin:0}.actions input{width:7em;font-size:11px}
button{font-size:12px;padding:2px 8px;border:1px solid #2456a6;background:#fff;color:#2456a6;border-radius:4px;cursor:pointer}
button.danger{border-color:#c0392b;color:#c0392b}
.heldnote{background:#fff4d6;border:1px solid #e7c66b;padding:6px 10px}.flash{background:#e8f1fd;border:1px solid #9fbdf0;padding:6px 10px}.note{color:#5b6475;font-size:12px}
.filters a{margin-right:8px;font-size:12px}.filters a.sel{font-weight:700}
.t{white-space:nowrap}footer{margin-top:18px;color:#5b6475;font-size:12px}
"""
