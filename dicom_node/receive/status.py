"""C-STORE statuses the receiver answers (PS3.4 Annex B.2.3, pynetdicom's storescp)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["StoreStatus"]


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    # Transient: senders retry A7xx, so only for what passes (disk, database).
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC210
    INVALID_UID = 0xC211
    # Declared pixel data above node.max_pixel_bytes: a Cxxx "cannot
    # understand" rather than A700, because this instance will never fit and
    # a sender retrying A7xx would only repeat the refusal.
    PIXELS_TOO_LARGE = 0xC220
    # A Deflated Explicit VR dataset inflating past node.max_inflate_ratio
    # (or max_pixel_bytes): a decompression bomb, refused while inflating.
    INFLATES_TOO_FAR = 0xC221
    # A bug of ours: not A7xx, which senders retry forever.
    PROCESSING_FAILURE = 0x0110

    @property
    def label(self) -> str:
        """The metric label: the status as senders see it."""
        return f"0x{int(self):04X}"
