"""STOW-RS: send result files to a DICOMweb service (``kind: dicomweb``).

Each file goes as written, its bytes unchanged (preamble, file meta and
dataset: a PS3.10 file is what an ``application/dicom`` part holds), several
per ``multipart/related`` POST to ``{url}/studies``, bounded by
``max_instances_per_request`` and ``max_request_bytes``.  dicomweb-client is
not used: its ``store_instances`` takes pydicom datasets and encodes them
again.

The answer is mapped to outcomes the outbox understands (PS3.18 10.5):

- 200, 202 (and 409, which lists what failed): the instances in the
  response's FailedSOPSequence fail by their FailureReason, the others are
  sent.  FailureReason 0xA7xx (out of resources), 0x0110 (processing
  failure) and values we do not know are transient, as a C-STORE status is
  for a DICOM destination; 0xA9xx (does not match SOP class), 0xCxxx
  (cannot understand), 0x0122 (SOP class not supported), 0x0124 (not
  authorized) and 0x0210-0x0212 are permanent; 0x0111 (duplicate SOP
  instance: the service has it already) counts as sent.
- 408, 429 and 5xx: transient, the whole request; also timeouts, refused
  or reset connections and TLS failures (a certificate can be fixed).
- Other 4xx and 3xx: permanent (a wrong URL, refused credentials, a request
  the service will never take); 413 with more than one instance is split
  and sent again in halves first.

Credentials are read from their files at each send (so they can be rotated
without a restart) and never appear in a reason, a log line or an error.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import requests

from dicom_node.config import DicomwebBasicAuth, DicomwebBearerAuth, DicomwebDestination
from dicom_node.errors import SendError
from dicom_node.send import statuses
from dicom_node.send.scu import StoreOutcome, StoreRequest

__all__ = ["USER_AGENT", "echo_dicomweb", "send_dicomweb"]

log = logging.getLogger("dicom_node.send")

USER_AGENT = "dicom-node"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


@dataclass
class _Part:
    request: StoreRequest
    data: bytes


def send_dicomweb(dest: DicomwebDestination, requests_: Sequence[StoreRequest]) -> list[StoreOutcome]:
    """POST the files in bounded batches; an outcome for every request.
    Raises SendError only when nothing could be tried (a secret file that
    cannot be read now)."""
    session = _session(dest)
    outcomes: list[StoreOutcome] = []
    try:
        parts: list[_Part] = []
        for req in requests_:
            try:
                parts.append(_Part(req, req.path.read_bytes()))
            except OSError as exc:
                outcomes.append(StoreOutcome(req.item_id, False, False,
                                             f"cannot read {req.path.name}: {exc.strerror}"))
        stop: StoreOutcome | None = None
        for batch in _batches(parts, dest.max_instances_per_request, dest.max_request_bytes):
            if stop is not None:  # the service is not there: do not knock again in this pass
                outcomes += [StoreOutcome(p.request.item_id, False, True, stop.reason) for p in batch]
                continue
            got = _post(session, dest, batch)
            outcomes += got
            if got and all(not o.ok and o.retryable for o in got) and _unreachable(got[0].reason):
                stop = got[0]
    finally:
        session.close()
    return outcomes


def echo_dicomweb(dest: DicomwebDestination) -> tuple[bool, str]:
    """A QIDO-RS query for one study: is the service there and do our
    credentials pass?  (ok, detail); never raises for a service that is down."""
    started = time.perf_counter()
    try:
        session = _session(dest)
    except SendError as exc:
        return False, exc.reason
    try:
        rsp = session.get(f"{dest.url}/studies", params={"limit": "1"},
                          headers={"Accept": "application/dicom+json"},
                          timeout=dest.timeout_s, allow_redirects=False)
    except requests.RequestException as exc:
        return False, f"{dest.url}: {_describe_exception(exc)}"
    finally:
        session.close()
    took = time.perf_counter() - started
    if rsp.status_code in (200, 204):
        return True, f"{dest.url} answered QIDO-RS (HTTP {rsp.status_code}) in {took:.2f} s"
    return False, f"{dest.url} answered QIDO-RS with HTTP {rsp.status_code} {rsp.reason}"


# -- request --------------------------------------------------------------------------


def _session(dest: DicomwebDestination) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy or .netrc credentials from the environment
    session.headers.update(dest.headers)
    session.headers["User-Agent"] = USER_AGENT
    auth = dest.auth
    if isinstance(auth, DicomwebBasicAuth):
        session.auth = (auth.username, _secret(dest, auth.password_file, "password_file"))
    elif isinstance(auth, DicomwebBearerAuth):
        session.headers["Authorization"] = "Bearer " + _secret(dest, auth.token_file, "token_file")
    tls = dest.tls
    if tls is not None:
        session.verify = str(tls.ca_file) if tls.ca_file and tls.verify else tls.verify
        if tls.certificate is not None and tls.private_key is not None:
            session.cert = (str(tls.certificate), str(tls.private_key))
    return session


def _secret(dest: DicomwebDestination, path: Path, key: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SendError(dest.name, f"destinations.{dest.name}.auth.{key}: cannot read {path}: {why}",
                        retryable=True) from None
    if not value:
        raise SendError(dest.name, f"destinations.{dest.name}.auth.{key}: {path} is empty",
                        retryable=True)
    return value


def _batches(parts: list[_Part], max_count: int, max_bytes: int) -> Iterator[list[_Part]]:
    batch: list[_Part] = []
    size = 0
    for part in parts:
        if batch and (len(batch) >= max_count or size + len(part.data) > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(part)
        size += len(part.data)
    if batch:
        yield batch


def _body(parts: list[_Part]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part.data,
                   b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _post(session: requests.Session, dest: DicomwebDestination, parts: list[_Part]) -> list[StoreOutcome]:
    body, content_type = _body(parts)
    try:
        rsp = session.post(f"{dest.url}/studies", data=body, timeout=dest.timeout_s,
                           allow_redirects=False,
                           headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    except requests.RequestException as exc:
        return _all(parts, _retryable_exception(exc), f"{dest.url}: {_describe_exception(exc)}")
    code = rsp.status_code
    where = f"{dest.url} HTTP {code}"
    if code == 413 and len(parts) > 1:
        half = len(parts) // 2
        log.info("%s: %d instances (%d bytes) too large for one request; sending in halves",
                 where, len(parts), len(body), extra={"destination": dest.name})
        return _post(session, dest, parts[:half]) + _post(session, dest, parts[half:])
    if code in (200, 202, 409) or (200 <= code < 300 and code != 204 and rsp.content):
        return _per_instance(parts, rsp, where, conflict=code == 409)
    if 200 <= code < 300:
        return _all(parts, None, where)
    reason = f"{where} {rsp.reason}".rstrip()
    if code in (408, 429) or code >= 500:
        return _all(parts, True, reason)
    if 300 <= code < 400:
        reason += f" (redirect to {rsp.headers.get('Location', '?')}: fix the url)"
    return _all(parts, False, reason)


def _all(parts: list[_Part], retryable: bool | None, reason: str) -> list[StoreOutcome]:
    """The same outcome for every part: sent when retryable is None."""
    if retryable is None:
        return [StoreOutcome(p.request.item_id, True, False, reason) for p in parts]
    return [StoreOutcome(p.request.item_id, False, retryable, reason) for p in parts]


def _per_instance(parts: list[_Part], rsp: requests.Response, where: str, *,
                  conflict: bool) -> list[StoreOutcome]:
    failed = _failed_instances(rsp)
    if failed is None:
        if conflict:
            return _all(parts, False, f"{where} Conflict (no stored instances)")
        if rsp.status_code == 202:
            # Accepted with warnings or failures we cannot read: do not claim delivery.
            return _all(parts, True, f"{where}: response without a readable FailedSOPSequence")
        return _all(parts, None, where)
    outcomes = []
    for part in parts:
        uid = part.request.sop_uid
        if uid not in failed:
            if conflict:  # 409: nothing was stored, whatever the list says
                outcomes.append(StoreOutcome(part.request.item_id, False, False, f"{where} Conflict"))
            else:
                outcomes.append(StoreOutcome(part.request.item_id, True, False, where))
            continue
        reason = failed[uid]
        if reason == statuses.DUPLICATE:
            outcomes.append(StoreOutcome(part.request.item_id, True, False,
                                         f"{where}: already stored (0x0111)"))
            continue
        text = f"{where}: FailureReason {statuses.describe(reason)}" if reason >= 0 else f"{where}: failed"
        permanent = reason >= 0 and statuses.is_permanent(reason)
        outcomes.append(StoreOutcome(part.request.item_id, False, not permanent, text))
    return outcomes


def _failed_instances(rsp: requests.Response) -> dict[str, int] | None:
    """SOP instance UID -> FailureReason (-1 when absent) from a
    DICOM JSON response; None when the body is not one."""
    try:
        body = json.loads(rsp.content or b"null")
    except ValueError:
        return None
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict):
        return None
    failed: dict[str, int] = {}
    for item in (body.get(_FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        if not isinstance(item, dict):
            continue
        uid = _first(item, _REFERENCED_SOP_INSTANCE_UID)
        reason = _first(item, _FAILURE_REASON)
        if isinstance(uid, str):
            failed[uid] = reason if isinstance(reason, int) else -1
    return failed


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _retryable_exception(exc: requests.RequestException) -> bool:
    # Connection refused or reset, timeouts, TLS handshake failures: the
    # service or its certificate can come back.  A malformed URL cannot.
    return isinstance(exc, (requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError))


def _unreachable(reason: str) -> bool:
    return reason.endswith(("refused", "timed out", "unreachable", "TLS failure", "reset"))


def _describe_exception(exc: requests.RequestException) -> str:
    """A short reason without the request (no headers, so no credentials)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS failure"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, requests.Timeout):
        return "no response, timed out"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        if "reset" in text or "aborted" in text:
            return "connection reset"
        return "host unreachable"
    return f"request failed ({type(exc).__name__})"
