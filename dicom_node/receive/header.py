"""The header attributes the receiver needs, read from a received file
without loading or inflating the whole dataset.

Reading stops after the last attribute we need (a tag above NumberOfSlices),
values of other attributes are skipped with a seek, and a Deflated Explicit
VR dataset is inflated in bounded steps: only its first HEADER_WINDOW bytes
are kept, the rest is inflated only to measure it, and inflation stops (the
instance is refused) as soon as the inflated size passes the bound.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import (
    _read_file_meta_info,
    read_dataset,
    read_partial,
    read_preamble,
)
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.limits import PIXEL_TAGS, declared_pixel_bytes
from dicom_node.receive.status import StoreStatus
from dicom_node.store.header import HEADER_WINDOW
from dicom_node.store.spool import is_valid_uid

__all__ = ["Header", "BadInstance", "InflateBound", "read_header",
           "HEADER_TAGS", "HEADER_WINDOW"]

HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
               "Modality", "ImagesInAcquisition", "NumberOfSlices", *PIXEL_TAGS]
_TAGS: list[BaseTag | int] = [Tag(k) for k in HEADER_TAGS]
_LAST_TAG = max(_TAGS)  # (0054,0081) NumberOfSlices
_VRS = [dictionary_VR(t) for t in _TAGS]
_TRANSFER_SYNTAX = Tag("TransferSyntaxUID")
# The plain forms of the header's values that _value reads itself; pydicom
# gives the same value for each (tests/test_receive_header.py).
_PLAIN = {
    "UI": re.compile(rb"[\0 ]*([0-9.]*)[\0 ]*\Z"),
    "CS": re.compile(rb"((?:[A-Za-z0-9_][A-Za-z0-9_ ]*?)?) *\Z"),
    "IS": re.compile(rb" *([0-9]+) *\Z"),
}

# A deflated dataset may always inflate to this much, whatever its ratio:
# small highly compressible instances (an empty SR, a blank frame) are fine.
INFLATE_FLOOR = 64 * 1024 * 1024
_READ = 256 * 1024
_OUT = 1024 * 1024  # inflated bytes produced per step: the memory bound


@dataclass(frozen=True)
class Header:
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    expected_count: int | None
    # Decoded size the header declares (see dicom_node.limits).
    pixel_bytes: int = 0
    # From the file meta: what the sender's context used.
    transfer_syntax: str = ""


class BadInstance(Exception):
    """The status to answer and why."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InflateBound:
    """How far a deflated dataset may inflate (node.max_inflate_ratio and
    node.max_pixel_bytes)."""

    ratio: int
    max_pixel_bytes: int

    def limit(self, deflated_size: int) -> int:
        by_ratio = max(INFLATE_FLOOR, self.ratio * deflated_size)
        return min(by_ratio, self.max_pixel_bytes + INFLATE_FLOOR)


def _after_header(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_TAG


def read_header(path: Path, bound: InflateBound) -> Header:
    """Raises BadInstance with the status and reason to answer."""
    try:
        with path.open("rb") as fp:
            ds, transfer_syntax, truncated = _read(fp, path.stat().st_size, bound)
        values = header_values(ds)
    except BadInstance:
        raise
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError,
            NotImplementedError, OverflowError, zlib.error) as exc:
        raise BadInstance(StoreStatus.CANNOT_UNDERSTAND, f"unparseable dataset: {exc}") from exc
    for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        value = values[key]
        if value is None and truncated:
            raise BadInstance(StoreStatus.CANNOT_UNDERSTAND,
                              f"{key} not within the first {HEADER_WINDOW} inflated bytes")
        if value is None or not is_valid_uid(str(value)):
            raise BadInstance(StoreStatus.INVALID_UID, f"missing or invalid {key} {str(value)!r:.80}")
    return Header(
        sop_class=str(values["SOPClassUID"]), sop_uid=str(values["SOPInstanceUID"]),
        study_uid=str(values["StudyInstanceUID"]), series_uid=str(values["SeriesInstanceUID"]),
        modality=str(values["Modality"] or ""),
        expected_count=_positive_int(values["ImagesInAcquisition"]) or _positive_int(values["NumberOfSlices"]),
        pixel_bytes=declared_pixel_bytes(values),
        transfer_syntax=transfer_syntax,
    )


def header_values(ds: Dataset) -> dict[str, Any]:
    """``{keyword: ds.get(keyword)}`` for HEADER_TAGS, with the same values."""
    return {keyword: _value(ds, keyword, tag, vr)
            for keyword, tag, vr in zip(HEADER_TAGS, _TAGS, _VRS, strict=True)}


def _value(ds: Dataset, keyword: str, tag: BaseTag | int, vr: str) -> Any:
    """What ``ds.get(keyword)`` gives, read straight from the raw bytes where
    they are in a plain form: pydicom converts and validates each value (a
    regular expression per UID), a tenth of a receiver's Python time per
    instance.  Anything else (another VR, several values, other characters)
    is pydicom's to read."""
    raw = ds.get_item(tag)
    if raw is None:
        return None
    if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes) or raw.VR not in (None, vr):
        return ds.get(keyword)
    value = raw.value
    if vr == "US" and len(value) in (0, 2):
        return struct.unpack("<H" if raw.is_little_endian else ">H", value)[0] if value else None
    if vr == "IS" and not value:
        return None
    plain = _PLAIN.get(vr)
    match = plain.match(value) if plain is not None else None
    if match is None:
        return ds.get(keyword)
    text = match.group(1).decode("ascii")
    return int(text) if vr == "IS" else text


def _read(fp: BinaryIO, size: int, bound: InflateBound) -> tuple[Dataset, str, bool]:
    """(dataset of the header tags, transfer syntax, whether the inflated
    window was cut before the header ended)."""
    read_preamble(fp, False)
    transfer_syntax = _transfer_syntax(fp)
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        syntax = UID(transfer_syntax)
        if not syntax.is_transfer_syntax:  # no or an unknown syntax: pydicom guesses
            fp.seek(0)
            return read_partial(fp, stop_when=_after_header, specific_tags=_TAGS), transfer_syntax, False
        # On from the end of the meta, which read_partial would parse again
        # (700 -> 500 us an instance).
        ds = read_dataset(fp, syntax.is_implicit_VR, syntax.is_little_endian,
                          stop_when=_after_header, specific_tags=_TAGS)
        return ds, transfer_syntax, False
    deflated = size - fp.tell()
    window, total = _inflate(fp, bound.limit(deflated), deflated)
    ds = read_dataset(BytesIO(window), is_implicit_VR=False, is_little_endian=True,
                      stop_when=_after_header, specific_tags=_TAGS)
    return ds, transfer_syntax, total > len(window)


def _transfer_syntax(fp: BinaryIO) -> str:
    """The file meta's Transfer Syntax UID, with ``fp`` left where the
    dataset starts.  The meta is read as raw elements first: pydicom's
    FileMetaDataset converts and validates each of them, which took a tenth
    of a receiver's Python time per instance for one value; a meta whose
    syntax is not in a plain form is read by pydicom as before."""
    start = fp.tell()
    try:
        raw = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_after_meta)
        syntax = _value(raw, "TransferSyntaxUID", _TRANSFER_SYNTAX, "UI")
    except (ValueError, TypeError, KeyError, EOFError, NotImplementedError, OverflowError):
        syntax = None  # pydicom's own reader retries a broken meta (as implicit VR)
    if isinstance(syntax, str) and syntax:
        return syntax
    fp.seek(start)
    return str(_read_file_meta_info(fp).get("TransferSyntaxUID", ""))


def _after_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 2


def _inflate(fp: BinaryIO, limit: int, deflated: int) -> tuple[bytes, int]:
    """Inflate the rest of ``fp`` (raw deflate, PS3.5 A.5) in bounded steps:
    the first HEADER_WINDOW bytes and the inflated total.  Raises BadInstance
    once the total passes ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    window = bytearray()
    total = 0
    while not inflater.eof:
        data = inflater.unconsumed_tail or fp.read(_READ)
        if not data:
            break  # truncated stream: the header (if any) is still readable
        out = inflater.decompress(data, _OUT)
        total += len(out)
        if total > limit:
            raise BadInstance(StoreStatus.INFLATES_TOO_FAR,
                              f"deflated dataset of {deflated} bytes inflates past {limit} bytes "
                              f"(node.max_inflate_ratio, node.max_pixel_bytes)")
        if len(window) < HEADER_WINDOW:
            window += out[:HEADER_WINDOW - len(window)]
    return bytes(window), total


def _positive_int(value: Any) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None
