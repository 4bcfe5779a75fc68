"""One validated, frozen configuration tree, read from YAML once at start.

Defaults live here and nowhere else.  Errors name the key and the reason so
``dicom-node check-config`` can tell an operator exactly what to fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo,
                      field_serializer, field_validator, model_validator)

from dicom_node.errors import ConfigError
from dicom_node.security.tls import client_context, server_context

__all__ = [
    "AETitle",
    "Peer",
    "TlsSettings",
    "PeerTlsSettings",
    "DicomDestination",
    "FolderDestination",
    "SenderDestination",
    "DicomwebDestination",
    "Destination",
    "Match",
    "Route",
    "NodeSettings",
    "InferenceSettings",
    "KServeSettings",
    "KServeTarget",
    "KServeTlsSettings",
    "ModelBackendSettings",
    "OutboxSettings",
    "RetentionSettings",
    "Config",
    "load_config",
    "find_config",
    "check_deployment",
    "DEFAULT_CONFIG",
    "SYSTEM_CONFIG",
    "CONFIG_ENV",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "node.yaml"
# Where the CLI and ``serve`` look for the configuration without ``-c``, in order:
# $DICOM_NODE_CONFIG, SYSTEM_CONFIG, then the embedded DEFAULT_CONFIG.
CONFIG_ENV = "DICOM_NODE_CONFIG"
SYSTEM_CONFIG = Path("/etc/dicom-node/node.yaml")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without backslash")
    return value.strip()


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


# -- TLS (built into ssl contexts by dicom_node/security/tls.py, which imports
# nothing of ours; here only to refuse unusable files at load) -----------------
# TLS 1.2 or newer only; that is fixed, not a setting.  Relative paths resolve
# against the config's base dir (as data_dir does) and the files must exist
# when the configuration is loaded, so check-config names a missing one.


def _secret_file(value: Path, info: ValidationInfo) -> Path:
    """A password or token file: it exists, is readable, and is not empty.
    Its content is read when it is used, never kept in the configuration."""
    path = _tls_file(value, info)
    assert path is not None
    if not path.read_bytes().strip():
        raise ValueError(f"{path}: empty")
    return path


def _tls_file(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = _resolve(Path(base), value) if base is not None else value
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not readable by this user")
    return path


class TlsSettings(_Frozen):
    """``node.tls``: the DICOM port then speaks TLS only (no plain DICOM on it)."""

    certificate: Path  # PEM, our certificate (followed by any intermediates)
    private_key: Path  # PEM, unencrypted: the node runs unattended
    # PEM bundle of the CAs that client certificates must chain to.  With it a
    # presented client certificate is verified; without it none is asked for.
    ca_file: Path | None = None
    # Refuse clients without a certificate from ca_file (mutual TLS).
    require_client_certificate: bool = False

    _files = field_validator("certificate", "private_key", "ca_file")(_tls_file)

    @model_validator(mode="after")
    def _loadable(self) -> TlsSettings:
        if self.require_client_certificate and self.ca_file is None:
            raise ValueError("require_client_certificate needs ca_file to verify clients against")
        server_context(self)  # a key that does not match, or a non-PEM file, fails here
        return self


class PeerTlsSettings(_Frozen):
    """``peers[].tls``: send to this peer over TLS."""

    # PEM bundle of the CAs the peer's certificate must chain to; the system's
    # CAs when omitted.  The peer's certificate is always verified.
    ca_file: Path | None = None
    # Our client certificate and key, for peers that require one.
    certificate: Path | None = None
    private_key: Path | None = None
    # Off by default: DICOM peers are usually configured by IP address and
    # their certificates rarely carry that address (or the DNS name) as a
    # subjectAltName; trust comes from the CA (often a site's private CA).
    # Turn it on when the peer's certificate names ``host``.
    check_hostname: bool = False

    _files = field_validator("certificate", "private_key", "ca_file")(_tls_file)

    @model_validator(mode="after")
    def _loadable(self) -> PeerTlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (give both or neither)")
        client_context(self)
        return self


class Peer(_Frozen):
    """A DICOM application entity we know: a modality, a PACS, a workstation."""

    name: str
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    # May this peer send us instances (only checked when allow_any_caller is false)?
    may_send: bool = True
    # Check that the association comes from ``host`` as well as from the AE title.
    check_host: bool = False
    # May results be sent to this peer (as a destination, or back to it as the sender)?
    may_receive_results: bool = True
    # Associations this peer may hold open with us at once (None: only the node's limit).
    max_associations: int | None = Field(default=None, ge=1)
    # Associations the outbox opens at once to send results to this peer.
    # More than one overlaps our work with the peer's (most PACS accept
    # several); one keeps the order of arrival for peers that need it.
    send_associations: int = Field(default=1, ge=1, le=8)
    # Send to this peer over TLS (see PeerTlsSettings); plain DICOM when absent.
    tls: PeerTlsSettings | None = None

    _ae = field_validator("ae_title")(_check_ae)


class DicomDestination(_Frozen):
    kind: Literal["dicom"]
    name: str
    peer: str  # name of an entry in ``peers``


class FolderDestination(_Frozen):
    kind: Literal["folder"]
    name: str
    # Relative paths are under the node's data dir.
    path: Path


class SenderDestination(_Frozen):
    """Send results back to the AE that sent the source (must be a known peer)."""

    kind: Literal["sender"]
    name: str


class DicomwebBasicAuth(_Frozen):
    """HTTP basic auth; the password is read from a file at each send."""

    kind: Literal["basic"]
    username: str = Field(min_length=1, pattern=r"^[^:\s]+$")
    password_file: Path

    _files = field_validator("password_file")(_secret_file)


class DicomwebBearerAuth(_Frozen):
    """``Authorization: Bearer <token>``; the token is read from a file at each send."""

    kind: Literal["bearer"]
    token_file: Path

    _files = field_validator("token_file")(_secret_file)


class DicomwebNoAuth(_Frozen):
    kind: Literal["none"]


DicomwebAuth = Annotated[DicomwebNoAuth | DicomwebBasicAuth | DicomwebBearerAuth,
                         Field(discriminator="kind")]


class DicomwebTlsSettings(_Frozen):
    """``destinations[].tls`` of a dicomweb destination (an https:// url)."""

    # PEM bundle of the CAs the server's certificate must chain to; the
    # system's CAs when omitted.
    ca_file: Path | None = None
    # Our client certificate and key, for servers that require one.
    certificate: Path | None = None
    private_key: Path | None = None
    # Verify the server's certificate and host name.  Off is for a test
    # bench only (urllib3 warns at each request).
    verify: bool = True

    _files = field_validator("certificate", "private_key", "ca_file")(_tls_file)

    @model_validator(mode="after")
    def _pair(self) -> DicomwebTlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (give both or neither)")
        if not self.verify and self.ca_file is not None:
            raise ValueError("ca_file has no meaning with verify: false")
        return self


# Headers the sender sets itself, or that would put a secret inline.
_DICOMWEB_OWN_HEADERS = {"authorization", "content-type", "content-length", "accept", "host",
                         "transfer-encoding"}


class DicomwebDestination(_Frozen):
    """STOW-RS to a DICOMweb service (dicom_node/send/dicomweb.py)."""

    kind: Literal["dicomweb"]
    name: str
    # Base URL of the service; instances are POSTed to {url}/studies.
    url: str
    auth: DicomwebAuth | None = None
    tls: DicomwebTlsSettings | None = None
    # Seconds to connect, and to wait for each response.
    timeout_s: float = Field(default=60.0, gt=0)
    # Bounds of one STOW-RS request; a single larger file goes alone.
    max_instances_per_request: int = Field(default=50, ge=1, le=1000)
    max_request_bytes: int = Field(default=64 * 1024 ** 2, ge=1024)
    # Sent with every request (a tenant, an API gateway key name...).
    headers: dict[str, str] = Field(default_factory=dict)

    _masked = field_serializer("headers")(lambda self, value: _mask_headers(value))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {value!r}: expected http(s)://host[:port]/path, the service's "
                             "base URL (e.g. http://pacs:8042/dicom-web)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url: credentials do not go in the url; use auth with a "
                             "password_file or token_file")
        if parts.query or parts.fragment:
            raise ValueError(f"url {value!r}: no query or fragment in a base URL")
        try:
            _ = parts.port  # out of range or not a number
        except ValueError as exc:
            raise ValueError(f"url {value!r}: {exc}") from None
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        _check_headers(value)
        for key in value:
            if key.lower() in _DICOMWEB_OWN_HEADERS:
                raise ValueError(f"header {key}: set by the sender"
                                 + (" (credentials go in auth, from a file)"
                                    if key.lower() == "authorization" else ""))
        return value

    @model_validator(mode="after")
    def _tls_needs_https(self) -> DicomwebDestination:
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError("tls: has no meaning with an http:// url (use https://)")
        return self


Destination = Annotated[
    DicomDestination | FolderDestination | SenderDestination | DicomwebDestination,
    Field(discriminator="kind")
]


class Range(_Frozen):
    min: float | None = None
    max: float | None = None


class Match(_Frozen):
    """One condition on a DICOM keyword (or on the association: CallingAE, CalledAE,
    InstanceCount).  Exactly one of the operators is given."""

    keyword: str
    equals: str | float | None = None
    one_of: list[str | float] | None = None
    regex: str | None = None
    contains: str | None = None
    range: Range | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one_operator(self) -> Match:
        ops = [n for n in ("equals", "one_of", "regex", "contains", "range", "present")
               if getattr(self, n) is not None]
        if len(ops) != 1:
            raise ValueError(f"match on {self.keyword!r} needs exactly one operator "
                             f"(equals, one_of, regex, contains, range, present), got {ops or 'none'}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"match on {self.keyword!r}: bad regex {self.regex!r}: {exc}") from exc
        return self


class Route(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    match: list[Match] = Field(min_length=1)
    pipeline: str
    model: str
    destinations: list[str] = Field(min_length=1)
    # No instance for this long and the series (or study) is complete.
    quiet_seconds: float = Field(default=10.0, gt=0)
    group_by: Literal["series", "study"] = "series"
    # Where results go instead of ``destinations`` when the pipeline reports
    # this outcome, e.g. {abnormal: [priority_reading]} for CXR triage.
    result_destinations: dict[str, list[str]] = Field(default_factory=dict)
    # Pipeline-specific settings (batch size, thresholds...), validated by the pipeline.
    options: dict[str, Any] = Field(default_factory=dict)


class HttpSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=9109, ge=0, le=65535)
    # The status page (GET /, /api/...): read-only, no patient data.
    status_page: bool = True
    # Where the page is served behind a reverse proxy, e.g. "/dicom-node";
    # its links carry the prefix, requests are accepted with or without it.
    path_prefix: str = ""
    # POST actions (retry, release/discard a held job, revive dead letters,
    # echo a destination) need one of these; without them POST answers 403.
    # Authorization: Bearer <token>
    token: SecretStr | None = None
    # Or HTTP basic auth (both or neither).
    username: str | None = Field(default=None, min_length=1, pattern=r"^[^:\s]+$")
    password: SecretStr | None = None

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
            raise ValueError(f"path_prefix {value!r} must look like /name or /a/b "
                             "(letters, digits, . _ ~ -)")
        return value

    @field_validator("token", "password")
    @classmethod
    def _long_enough(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 12:
            raise ValueError(f"{info.field_name} must be at least 12 characters")
        return value

    @model_validator(mode="after")
    def _basic_pair(self) -> HttpSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together (give both or neither)")
        return self

    @property
    def actions_enabled(self) -> bool:
        return self.token is not None or self.username is not None


class NodeSettings(_Frozen):
    ae_title: AETitle = "DICOM_NODE"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    data_dir: Path = Path("data")
    # Accept associations from any calling AE.  Convenient, and logged as a warning.
    allow_any_caller: bool = True
    # Check the called AE title against ``ae_title``.
    require_called_ae: bool = False
    # Largest P-DATA PDU we receive; 0 (no limit in DICOM) and anything over
    # 4 MiB advertise and enforce 4 MiB (dicom_node/net/pdu.py HARD_MAX_PDU).
    max_pdu: int = Field(default=262144, ge=0)
    # Established associations at once (per receiver process); connections
    # still negotiating do not count.
    max_associations: int = Field(default=16, ge=1)
    # TCP connections open at once on the DICOM port (per receiver process),
    # negotiating or established; one more is closed at once, before a thread
    # is started for it.  Default: 4 x max_associations.  At least
    # max_associations, and leave headroom: refusing an association (with a
    # reason) needs a connection.
    max_connections: int | None = Field(default=None, ge=1)
    network_timeout_s: float = Field(default=60, gt=0)
    # Seconds an idle association is kept before we release it.
    acse_timeout_s: float = Field(default=30, gt=0)
    workers: int = Field(default=1, ge=0)
    # Receiver processes accepting from one listening socket (each takes the
    # next connection when free); more than one lets concurrent associations
    # use more than one core.
    receivers: int = Field(default=1, ge=1)
    http: HttpSettings = HttpSettings()
    # TLS on the DICOM port: when set the port accepts TLS connections only.
    tls: TlsSettings | None = None
    # -- back-pressure and resource limits --
    # Below this many free bytes on the data dir new instances are refused
    # (0xA700) and the node is not ready; what is spooled is still processed.
    min_free_bytes: int = Field(default=1024 ** 3, ge=0)
    # Below the watermark also reject new associations (transient, congestion),
    # so senders queue on their side instead of sending instances we refuse.
    refuse_associations_below_watermark: bool = False
    # Largest declared Rows x Columns x NumberOfFrames x SamplesPerPixel x
    # BitsAllocated/8 accepted: a decompression bomb is refused before any
    # pixel buffer is allocated, at reception and again in the worker.
    max_pixel_bytes: int = Field(default=2 * 1024 ** 3, ge=1)
    # Deflated Explicit VR datasets are inflated in bounded steps at reception
    # and refused (0xC221) once the inflated size passes max(64 MiB, this x
    # the deflated size), or max_pixel_bytes + 64 MiB, whichever is lower.
    # Real images deflate 2-20:1; deflate itself cannot exceed about 1032:1.
    max_inflate_ratio: int = Field(default=100, ge=1)

    _ae = field_validator("ae_title")(_check_ae)

    @model_validator(mode="after")
    def _connections_cover_associations(self) -> NodeSettings:
        if self.max_connections is not None and self.max_connections < self.max_associations:
            raise ValueError(f"node.max_connections {self.max_connections} is below "
                             f"node.max_associations {self.max_associations}: every association "
                             "needs a connection")
        return self

    @property
    def connection_limit(self) -> int:
        """max_connections, or its default of 4 x max_associations."""
        return self.max_connections if self.max_connections is not None else 4 * self.max_associations


class KServeTlsSettings(_Frozen):
    """TLS to a KServe v2 server (``inference.kserve.tls``, ``inference.models.NAME.tls``)."""

    # PEM bundle of the CAs the server's certificate must chain to; the
    # system's CAs when omitted.  The server's certificate and host name are
    # always verified.
    ca_file: Path | None = None
    # Our client certificate and key, for servers that require one.
    certificate: Path | None = None
    private_key: Path | None = None

    _files = field_validator("certificate", "private_key", "ca_file")(_tls_file)

    @model_validator(mode="after")
    def _pair(self) -> KServeTlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (give both or neither)")
        return self


def _check_url(value: str | None) -> str | None:
    if value is None:
        return None
    if "://" in value:
        raise ValueError(f"url {value!r}: give host:port without a scheme; the protocol is set by "
                         "protocol and TLS by tls")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"url {value!r}: expected host:port")
    return value


def _mask_headers(value: dict[str, str] | None) -> dict[str, str] | None:
    """Header values are often credentials: check-config prints their names only."""
    return None if value is None else {key: "(set)" for key in value}


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    for key, text in value.items():
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", key):
            raise ValueError(f"header name {key!r} is not a valid HTTP header name")
        if any(c in text for c in "\r\n\0"):
            raise ValueError(f"header {key}: value holds a line break or NUL")
    return value


class KServeSettings(_Frozen):
    """``inference.kserve``: the KServe v2 server (a Triton) for every model
    whose backend is ``kserve``; each field can be overridden per model."""

    url: str | None = None  # host:port (Triton: 8001 gRPC, 8000 HTTP)
    protocol: Literal["grpc", "http"] = "grpc"
    # Deadline of each call to the server (metadata, inference).
    timeout_s: float = Field(default=60.0, gt=0)
    tls: KServeTlsSettings | None = None
    # Sent with every request (an API key, a tenant): the server's business.
    headers: dict[str, str] = Field(default_factory=dict)

    _url = field_validator("url")(_check_url)
    _headers = field_validator("headers")(_check_headers)
    _masked = field_serializer("headers")(lambda self, value: _mask_headers(value))


class ModelBackendSettings(_Frozen):
    """``inference.models.NAME``: where one model runs.  Unset fields come
    from ``inference.backend`` and ``inference.kserve``."""

    backend: Literal["onnxruntime", "kserve"] | None = None
    url: str | None = None
    protocol: Literal["grpc", "http"] | None = None
    # The model's name and version on the server; default: the manifest's
    # name, and the server's version policy (usually the newest).
    model_name: str | None = Field(default=None, min_length=1)
    model_version: str | None = Field(default=None, pattern=r"^[0-9]+$")
    timeout_s: float | None = Field(default=None, gt=0)
    tls: KServeTlsSettings | None = None
    headers: dict[str, str] | None = None

    _url = field_validator("url")(_check_url)
    _headers = field_validator("headers")(_check_headers)
    _masked = field_serializer("headers")(lambda self, value: _mask_headers(value))


class KServeTarget(_Frozen):
    """One model's resolved KServe endpoint (built by InferenceSettings.target)."""

    url: str
    protocol: Literal["grpc", "http"]
    model_name: str
    model_version: str = ""
    timeout_s: float
    tls: KServeTlsSettings | None = None
    headers: dict[str, str] = Field(default_factory=dict)


_REMOTE_FIELDS = ("url", "protocol", "model_name", "model_version", "timeout_s", "tls", "headers")


class InferenceSettings(_Frozen):
    models_dir: Path = Path(__file__).resolve().parent.parent / "models_onnx"
    # Where models run: onnxruntime in this process, or a KServe v2 server
    # (Triton) at inference.kserve; inference.models overrides it per model.
    backend: Literal["onnxruntime", "kserve"] = "onnxruntime"
    kserve: KServeSettings = KServeSettings()
    models: dict[str, ModelBackendSettings] = Field(default_factory=dict)
    providers: list[Literal["TensorrtExecutionProvider", "CUDAExecutionProvider",
                            "CPUExecutionProvider"]] = [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    device_id: int = Field(default=0, ge=0)
    intra_op_threads: int = Field(default=0, ge=0)  # 0 = onnxruntime decides
    batch_size: int = Field(default=4, ge=1)
    # /readyz is not ready while a model run in process got no GPU provider
    # (a GPU node quietly fallen back to the CPU); remote models are the server's.
    require_gpu: bool = False

    @model_validator(mode="after")
    def _gpu(self) -> InferenceSettings:
        gpu = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
        if self.require_gpu and not gpu & set(self.providers):
            raise ValueError(f"inference.require_gpu: true needs a GPU provider in inference.providers "
                             f"(it has {', '.join(self.providers)})")
        return self

    @model_validator(mode="after")
    def _backends(self) -> InferenceSettings:
        for name, model in self.models.items():
            if not re.fullmatch(r"[a-z0-9_]+", name):
                raise ValueError(f"inference.models.{name}: not a model name (a manifest's name)")
            backend = model.backend or self.backend
            given = [f for f in _REMOTE_FIELDS if getattr(model, f) is not None]
            if backend == "onnxruntime" and given:
                raise ValueError(f"inference.models.{name}.{given[0]}: has no meaning with backend "
                                 "onnxruntime")
            if backend == "kserve" and (model.url or self.kserve.url) is None:
                raise ValueError(f"inference.models.{name}.url: backend kserve needs a url "
                                 "(here or in inference.kserve.url)")
        if self.backend == "kserve" and self.kserve.url is None:
            raise ValueError("inference.kserve.url: backend kserve needs the server's host:port")
        return self

    def backend_of(self, name: str) -> str:
        model = self.models.get(name)
        return (model.backend if model and model.backend else None) or self.backend

    def target(self, name: str) -> KServeTarget | None:
        """The KServe endpoint of model ``name``, None when it runs in process."""
        if self.backend_of(name) != "kserve":
            return None
        model = self.models.get(name) or ModelBackendSettings()
        server = self.kserve
        url = model.url or server.url
        if url is None:  # refused at load (_backends); checked again for the type checker
            raise ValueError(f"inference.models.{name}.url: backend kserve needs the server's host:port")
        return KServeTarget(
            url=url, protocol=model.protocol or server.protocol,
            model_name=model.model_name or name, model_version=model.model_version or "",
            timeout_s=model.timeout_s or server.timeout_s,
            tls=model.tls if model.tls is not None else server.tls,
            headers={**server.headers, **(model.headers or {})})


class OutboxSettings(_Frozen):
    retry_initial_s: float = Field(default=2.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    dead_after_s: float = Field(default=86400.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)


class RetentionSettings(_Frozen):
    """How long finished work stays on disk; only what nothing needs is removed."""

    # Spooled instances of series whose jobs all ended (done, failed, skipped).
    spool_days: float = Field(default=7, ge=0)
    # data/outgoing/job-N folders whose results were all sent (or are dead letters).
    results_days: float = Field(default=7, ge=0)
    # Seconds between retention passes (one also runs at start).
    interval_s: float = Field(default=600, gt=0)


class JobSettings(_Frozen):
    # A job whose worker dies is tried again this many times before it fails.
    max_attempts: int = Field(default=3, ge=1)


class Config(_Frozen):
    node: NodeSettings = NodeSettings()
    peers: list[Peer] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    inference: InferenceSettings = InferenceSettings()
    outbox: OutboxSettings = OutboxSettings()
    jobs: JobSettings = JobSettings()
    retention: RetentionSettings = RetentionSettings()
    # Where the file came from, for resolving relative paths; not a YAML key.
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _references(self) -> Config:
        _unique("peers", [p.name for p in self.peers])
        _unique("destinations", [d.name for d in self.destinations])
        _unique("routes", [r.name for r in self.routes])
        peer_names = {p.name for p in self.peers}
        for dest in self.destinations:
            if isinstance(dest, DicomDestination) and dest.peer not in peer_names:
                raise ValueError(f"destinations.{dest.name}.peer: unknown peer {dest.peer!r}")
            if isinstance(dest, DicomDestination) and not self.peer(dest.peer).may_receive_results:
                raise ValueError(f"destinations.{dest.name}.peer: peer {dest.peer!r} has "
                                 "may_receive_results: false")
        for name in self.inference.models:
            if not (self.models_dir / f"{name}.yaml").is_file():
                raise ValueError(f"inference.models.{name}: no manifest {name}.yaml in {self.models_dir}")
        dest_names = {d.name for d in self.destinations}
        for route in self.routes:
            for i, cond in enumerate(route.match):
                problem = _keyword_problem(cond.keyword)
                if problem:
                    raise ValueError(f"routes.{route.name}.match.{i}.keyword: {problem}")
            for name in route.destinations:
                if name not in dest_names:
                    raise ValueError(f"routes.{route.name}.destinations: unknown destination {name!r}")
            for outcome, names in route.result_destinations.items():
                for name in names:
                    if name not in dest_names:
                        raise ValueError(f"routes.{route.name}.result_destinations.{outcome}: "
                                         f"unknown destination {name!r}")
        return self

    @property
    def data_dir(self) -> Path:
        return _resolve(self.base_dir, self.node.data_dir)

    @property
    def models_dir(self) -> Path:
        return _resolve(self.base_dir, self.inference.models_dir)

    def peer(self, name: str) -> Peer:
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise KeyError(f"unknown peer {name!r}")

    def peer_by_ae(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"unknown destination {name!r}")

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(f"unknown route {name!r}")

    def folder_path(self, dest: FolderDestination) -> Path:
        return _resolve(self.data_dir, dest.path)


def _unique(section: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{section}: duplicate name {name!r}")
        seen.add(name)


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def _keyword_problem(keyword: str) -> str | None:
    """Why a match keyword can never match (None when it is a DICOM keyword
    from pydicom's dictionary or one of the router's association facts)."""
    from pydicom.datadict import keyword_dict

    from dicom_node.route.router import CONTEXT_KEYS

    if keyword in keyword_dict or keyword in CONTEXT_KEYS:
        return None
    known = [*CONTEXT_KEYS, *keyword_dict]
    return f"{keyword!r} is not a DICOM keyword{_did_you_mean(keyword, known)}"


def _did_you_mean(word: str, known: list[str]) -> str:
    import difflib

    folded = {k.lower(): k for k in known}
    if word.lower() in folded:
        return f" (did you mean {folded[word.lower()]}?)"
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def find_config() -> tuple[Path, str]:
    """The configuration ``serve`` and the CLI use without ``-c``, and why:
    $DICOM_NODE_CONFIG, then /etc/dicom-node/node.yaml, then the embedded default."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), f"from ${CONFIG_ENV}"
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG, "the system configuration"
    return DEFAULT_CONFIG, "the embedded default"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and freeze the configuration.

    Relative paths in the file (data dir, models dir, TLS files) resolve
    against the file's folder, whatever the working directory; folder
    destinations resolve against the data dir.  The embedded default
    (conf/node.yaml) resolves against the checkout, the folder above conf/,
    so ``make run`` keeps its data in ./data of the checkout.
    """
    path = path or DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    folder = path.resolve().parent
    if path.resolve() == DEFAULT_CONFIG:
        folder = folder.parent
    raw.setdefault("base_dir", str(folder))
    try:
        # The context lets TLS file paths resolve against base_dir while validating.
        return Config.model_validate(raw, context={"base_dir": raw["base_dir"]})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``--set a.b.c=v``; a list item is named by its index or its ``name``
    (``routes.0.quiet_seconds``, ``routes.ct.quiet_seconds``)."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: empty key part")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "(top level)"
        if isinstance(node, list):
            index = _list_index(node, part, key, where)
            if last:
                node[index] = value
                return
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}: {where} is a value ({node!r}), not a section")


def _list_index(items: list[Any], part: str, key: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"--set {key}: {where} has {len(items)} entries, no index {index}")
        return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    raise ConfigError(f"--set {key}: no entry named {part!r} in {where} "
                      f"(entries: {', '.join(map(str, names)) or 'none'})")


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


# -- the checks that look outside the file: ``check-config`` and ``serve`` ------


def check_deployment(config: Config, *, ports: bool) -> tuple[list[str], list[str]]:
    """Everything that would make the node fail later, checked now:
    (errors, warnings), each ``key: reason`` on one line.

    Each route's pipeline exists, its model's manifest exists and passes its
    contract check, and the pipeline can use the model (the checks the worker
    runs before every job); the data dir and the folder destinations are
    writable or can be created; the DICOM and HTTP ports are free (``ports``:
    ``serve`` checks them; for ``check-config`` a port in use, by the running
    node perhaps, is a warning); the hosts of peers that results go to resolve.
    A model on a remote (KServe) server that does not answer or does not
    pass is a warning: the server can change without the node, which starts
    and reports it on /readyz."""
    errors: list[str] = []
    warnings: list[str] = []
    errors += _check_routes(config, warnings)
    problem = _writable_dir(config.data_dir)
    if problem:
        errors.append(f"node.data_dir: {problem}")
    for dest in config.destinations:
        if isinstance(dest, FolderDestination):
            problem = _writable_dir(config.folder_path(dest))
            if problem:
                errors.append(f"destinations.{dest.name}.path: {problem}")
    node = config.node
    for key, host, port in (("node.port", node.host, node.port),
                            ("node.http.port", node.http.host, node.http.port)):
        problem = _port_problem(host, port)
        if problem:
            (errors if ports else warnings).append(f"{key}: {problem}")
    errors += _check_peer_hosts(config)
    return errors, warnings


def _check_routes(config: Config, warnings: list[str]) -> list[str]:
    from dicom_node.infer.engine import ModelRegistry
    from dicom_node.pipelines.base import check_pair, pipeline_names

    errors: list[str] = []
    known = pipeline_names()
    registry = ModelRegistry.from_settings(config.models_dir, config.inference)
    models = registry.names()
    verdicts: dict[str, Any] = {}
    for route in config.routes:
        key = f"routes.{route.name}"
        if route.pipeline not in known:
            errors.append(f"{key}.pipeline: unknown pipeline {route.pipeline!r}"
                          f"{_did_you_mean(route.pipeline, known)} (pipelines: {', '.join(known)})")
            continue
        if route.model not in models:
            errors.append(f"{key}.model: no manifest {route.model}.yaml in {config.models_dir}"
                          f"{_did_you_mean(route.model, models)} (models: {', '.join(models) or 'none'})")
            continue
        if route.model not in verdicts:
            verdicts[route.model] = _quietly(registry.check, route.model)
        verdict = verdicts[route.model]
        if verdict.transient or (not verdict.ok and registry.backend_of(route.model) == "kserve"):
            # A remote server's state (down, or without the model yet) can
            # change without the node: it starts and /readyz reports it.
            warnings.append(f"{key}.model: {route.model}: {verdict.detail} (the node starts; "
                            "/readyz reports it until the server has it)")
        elif not verdict.ok:
            errors.append(f"{key}.model: {route.model} failed its contract check: {verdict.detail}")
            continue
        try:
            manifest = registry.manifest(route.model)
        except Exception as exc:  # noqa: BLE001 - a bad manifest is the reason to report
            errors.append(f"{key}.model: {exc}")
            continue
        problems = check_pair(route.pipeline, manifest)
        if problems:
            errors.append(f"{key}.model: {route.model} does not suit pipeline {route.pipeline}: "
                          + "; ".join(problems))
    return errors


def _quietly(check: Any, name: str) -> Any:
    """A model check without its load-time warnings (the provider it fell
    back to): the node logs them when it loads the model, once."""
    import logging

    infer = logging.getLogger("dicom_node.infer")
    level = infer.level
    infer.setLevel(logging.ERROR)
    try:
        return check(name)
    finally:
        infer.setLevel(level)


def _writable_dir(path: Path) -> str | None:
    """Why ``path`` cannot be used as a folder to write in (None: it can).
    A missing folder must be creatable: its nearest existing parent is
    tried with a temporary folder, which is removed again."""
    import tempfile

    if path.exists():
        if not path.is_dir():
            return f"{path} is not a folder"
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
                pass
        except OSError as exc:
            return f"{path} is not writable: {exc.strerror}"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be created: {parent} is not a folder"
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".write-check-").cleanup()
    except OSError as exc:
        return f"{path} cannot be created: {parent} is not writable: {exc.strerror}"
    return None


def _port_problem(host: str, port: int) -> str | None:
    """Bind ``host:port`` as the node will (SO_REUSEADDR) and let it go."""
    import errno
    import socket

    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another dicom-node or server?)"
            if exc.errno == errno.EACCES:
                return f"port {port} on {host} needs root or CAP_NET_BIND_SERVICE"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _check_peer_hosts(config: Config) -> list[str]:
    """The hosts of peers that destinations send to must resolve."""
    import socket

    errors = []
    used = {d.peer: d.name for d in config.destinations if isinstance(d, DicomDestination)}
    for peer in config.peers:
        if peer.name not in used:
            continue
        try:
            socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            why = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
            errors.append(f"peers.{peer.name}.host: {peer.host!r} does not resolve ({why}); "
                          f"destination {used[peer.name]} sends to it")
    return errors
