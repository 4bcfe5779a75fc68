"""What a C-STORE status (or a STOW-RS FailureReason, which carries the same
codes) means for the outbox: stored, retry later, or never."""

from __future__ import annotations

__all__ = ["DUPLICATE", "is_success", "is_permanent", "describe"]

# Statuses after which sending the same object again cannot succeed.
_PERMANENT = {0x0122: "SOP class not supported", 0x0124: "not authorized",
              0x0210: "duplicate invocation", 0x0211: "unrecognized operation",
              0x0212: "mistyped argument"}
# STOW-RS: the instance is already there (a resend of ours): stored.
DUPLICATE = 0x0111


def is_success(status: int) -> bool:
    # 0x0000 success; 0xB000, 0xB006, 0xB007 warnings: the peer stored it.
    return status == 0x0000 or (status & 0xF000) == 0xB000


def is_permanent(status: int) -> bool:
    """0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand)
    and the named ones will not change on a retry; 0xA7xx (out of resources),
    0x0110 and statuses we do not know may, so they are transient."""
    return status in _PERMANENT or (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000


def describe(status: int) -> str:
    """``0xA900`` or ``0x0122 (SOP class not supported)``."""
    name = _PERMANENT.get(status)
    return f"0x{status:04X}" + (f" ({name})" if name else "")
