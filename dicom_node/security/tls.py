"""``ssl.SSLContext`` objects for DICOM TLS (PS3.15 Annex B, BCP 195).

TLS 1.2 or newer only, and not configurable: older versions are broken and
BCP 195, which the DICOM secure transport profiles follow, forbids them.
Certificates are always verified when the other side's certificate is asked
for; there is deliberately no "accept anything" switch.  The node runs
unattended, so an encrypted private key is refused rather than letting
OpenSSL prompt for a password on a terminal nobody watches.
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import Protocol

__all__ = ["MINIMUM_VERSION", "ClientContexts", "ClientTls", "ServerTls", "TlsError", "client_context",
           "server_context"]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


# What the contexts are built from.  Protocols rather than the config's
# classes: config.py imports this module to check the files at load, so this
# module imports nothing of the node's.
class ServerTls(Protocol):
    @property
    def certificate(self) -> Path: ...
    @property
    def private_key(self) -> Path: ...
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def require_client_certificate(self) -> bool: ...


class ClientTls(Protocol):
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def certificate(self) -> Path | None: ...
    @property
    def private_key(self) -> Path | None: ...
    @property
    def check_hostname(self) -> bool: ...


class TlsError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file.

    A ValueError so that configuration validation reports it under the key.
    """


def server_context(tls: ServerTls) -> ssl.SSLContext:
    """The SCP's context: our certificate and key, and the CA bundle that
    client certificates must chain to.  Without ``require_client_certificate``
    a client certificate is still verified when one is presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    _load_chain(ctx, tls.certificate, tls.private_key)
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: ClientTls) -> ssl.SSLContext:
    """The SCU's context for one peer: the server's certificate must chain to
    ``ca_file`` (or the system's CAs when none is given); our certificate is
    sent when the peer asks for one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED by default
    ctx.minimum_version = MINIMUM_VERSION
    ctx.check_hostname = tls.check_hostname
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(ctx, tls.certificate, tls.private_key)
    return ctx


class ClientContexts:
    """Client contexts built once per peer and reused for every send, rebuilt
    only when one of the peer's files changes (a renewed certificate is taken
    up without a restart).  Thread-safe: the dispatcher sends from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: dict[object, tuple[tuple[object, ...], ssl.SSLContext]] = {}

    def get(self, tls: ClientTls) -> ssl.SSLContext:
        stamp = _stamp(tls.ca_file, tls.certificate, tls.private_key)
        with self._lock:
            built = self._built.get(tls)
            if built is not None and built[0] == stamp:
                return built[1]
        ctx = client_context(tls)
        with self._lock:
            self._built[tls] = (stamp, ctx)
        return ctx


def _stamp(*paths: Path | None) -> tuple[object, ...]:
    """(mtime, size, inode) of each file, None for an absent one."""
    out: list[object] = []
    for path in paths:
        try:
            st = path.stat() if path is not None else None
        except OSError:
            st = None
        out.append(None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _refuse_password() -> str:
    raise TlsError("the private key is encrypted; give an unencrypted key file "
                   "readable only by the node's user")


def _load_chain(ctx: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    try:
        ctx.load_cert_chain(certificate, private_key, password=_refuse_password)
    except TlsError as exc:
        raise TlsError(f"private key {private_key}: {exc}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"certificate {certificate} with private key {private_key}: cannot load "
                       f"(not PEM, or the key does not match the certificate): {_why(exc)}") from exc


def _load_ca(ctx: ssl.SSLContext, ca_file: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"CA file {ca_file}: cannot load (not PEM certificates?): {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return str(reason or exc)
