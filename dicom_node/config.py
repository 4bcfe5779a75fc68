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
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from dicom_node.errors import ConfigError

__all__ = [
    "AETitle",
    "Peer",
    "TlsSettings",
    "PeerTlsSettings",
    "DicomDestination",
    "FolderDestination",
    "SenderDestination",
    "Destination",
    "Match",
    "Route",
    "NodeSettings",
    "InferenceSettings",
    "OutboxSettings",
    "RetentionSettings",
    "Config",
    "load_config",
    "DEFAULT_CONFIG",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "node.yaml"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without backslash")
    return value.strip()


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


# -- TLS (built into ssl contexts by dicom_node/security/tls.py) ------------------
# TLS 1.2 or newer only; that is fixed, not a setting.  Relative paths resolve
# against the config's base dir (as data_dir does) and the files must exist
# when the configuration is loaded, so check-config names a missing one.


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
    def _loadable(self) -> "TlsSettings":
        if self.require_client_certificate and self.ca_file is None:
            raise ValueError("require_client_certificate needs ca_file to verify clients against")
        from dicom_node.security.tls import server_context
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
    def _loadable(self) -> "PeerTlsSettings":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (give both or neither)")
        from dicom_node.security.tls import client_context
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


Destination = Annotated[
    DicomDestination | FolderDestination | SenderDestination, Field(discriminator="kind")
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
    def _one_operator(self) -> "Match":
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


class NodeSettings(_Frozen):
    ae_title: AETitle = "DICOM_NODE"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    data_dir: Path = Path("data")
    # Accept associations from any calling AE.  Convenient, and logged as a warning.
    allow_any_caller: bool = True
    # Check the called AE title against ``ae_title``.
    require_called_ae: bool = False
    max_pdu: int = Field(default=262144, ge=0)
    max_associations: int = Field(default=16, ge=1)
    network_timeout_s: float = Field(default=60, gt=0)
    # Seconds an idle association is kept before we release it.
    acse_timeout_s: float = Field(default=30, gt=0)
    workers: int = Field(default=1, ge=0)
    # Receiver processes sharing the DICOM port (SO_REUSEPORT); more than one
    # lets concurrent associations use more than one core.
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

    _ae = field_validator("ae_title")(_check_ae)


class InferenceSettings(_Frozen):
    models_dir: Path = Path(__file__).resolve().parent.parent / "models_onnx"
    providers: list[Literal["TensorrtExecutionProvider", "CUDAExecutionProvider",
                            "CPUExecutionProvider"]] = [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    device_id: int = Field(default=0, ge=0)
    intra_op_threads: int = Field(default=0, ge=0)  # 0 = onnxruntime decides
    batch_size: int = Field(default=4, ge=1)


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
    def _references(self) -> "Config":
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
        dest_names = {d.name for d in self.destinations}
        for route in self.routes:
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


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and freeze the configuration.

    Relative paths in the file (data dir, folder destinations) resolve against
    the working directory, so ``make run`` keeps its data under the checkout.
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
    raw.setdefault("base_dir", str(Path.cwd()))
    try:
        # The context lets TLS file paths resolve against base_dir while validating.
        return Config.model_validate(raw, context={"base_dir": raw["base_dir"]})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)
