"""Every attribute of a spooled instance before its pixel data, read in
bounded memory: what completion and routing look at.  Shared by the stages
that read spooled files (complete, route), so none of them imports the
receiver."""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_partial, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = ["HEADER_WINDOW", "read_header_dataset"]

# Inflated bytes of a deflated dataset kept for its header (the receiver uses
# the same bound for what it parses at reception).
HEADER_WINDOW = 4 * 1024 * 1024
_READ = 256 * 1024
# Values longer than this stay on disk until asked for (routing reads only
# short attributes), so a large private element costs no memory.
_DEFER = 64 * 1024


def _before_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= 0x7FE00010


def read_header_dataset(path: Path) -> Dataset:
    """Every attribute before the pixel data, for routing a spooled instance,
    in bounded memory: a deflated dataset is inflated no further than
    HEADER_WINDOW bytes (the receiver already refused those that inflate too
    far), and long values are read lazily."""
    with path.open("rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        if str(meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            fp.seek(0)
            head = read_partial(fp, stop_when=_before_pixels, defer_size=_DEFER)
            head.file_meta = meta
            return head
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        window = bytearray()
        while len(window) < HEADER_WINDOW and not inflater.eof:
            data = inflater.unconsumed_tail or fp.read(_READ)
            if not data:
                break
            window += inflater.decompress(data, HEADER_WINDOW - len(window))
    ds = read_dataset(BytesIO(bytes(window)), is_implicit_VR=False, is_little_endian=True,
                      stop_when=_before_pixels)
    ds.file_meta = meta
    return ds

