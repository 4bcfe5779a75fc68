"""Logging: one line per event, human-readable or JSON.  Messages carry UIDs
and job ids for tracing, never patient names or IDs.

Peer-supplied text (AE titles, UIDs, attribute values) can hold line breaks,
NUL and terminal escapes.  ``escape`` is the one place that makes such a value
safe to log; the formatters escape control characters in the final message
again, so a value that reached a message unescaped still cannot forge a line
or put a NUL into a text log.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RepeatLog", "escape", "extras", "setup_logging"]

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators
# some viewers break lines on.  Tab too: it can misalign a column-parsed log.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
_NAMED = {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x00: "\\0"}
_CONTROL.update(_NAMED)
# Exception text keeps its line breaks (it is ours), but not the rest.
_CONTROL_KEEP_NEWLINE = {k: v for k, v in _CONTROL.items() if k != 0x0A}

# Longest peer value put into a line; a 64 KiB AE title or UID is cut.
_MAX_VALUE_CHARS = 256


def escape(value: object, limit: int = _MAX_VALUE_CHARS) -> str:
    """A peer-supplied value as safe log text: control characters escaped
    (``\\n``, ``\\x1b``...), cut to ``limit`` characters with a note of how
    many more there were.  Use it for every value that came off the network."""
    text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
    extra = len(text) - limit
    if extra > 0:
        text = text[:limit]
    text = text.translate(_CONTROL)
    return f"{text}...(+{extra} chars)" if extra > 0 else text


def _safe(text: str) -> str:
    return text.translate(_CONTROL)


class _TextFormatter(logging.Formatter):
    """The text format, with control characters in the message escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = _safe(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return super().formatException(ei).translate(_CONTROL_KEEP_NEWLINE)


# What every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


def extras(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields a call passed with ``extra=`` (job_id,
    series_uid, destination, duration_s...)."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS and not k.startswith("_")}


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class _JsonFormatter(logging.Formatter):
    """One object per line: ts, level, logger, process, msg, then the
    record's structured fields (``extra=``) as keys of their own."""

    # json.dumps escapes every control character already (\n, \u0000, \u001b).
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                      + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name,
                "process": record.processName, "msg": record.getMessage()}
        for key, value in extras(record).items():
            body.setdefault(key, _jsonable(value))
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body)


# Libraries whose INFO lines are chatter for an operator (highdicom: "copy
# attributes of module ..." per object; pynetdicom: every PDU): WARNING and up.
_QUIET_LIBRARIES = ("pynetdicom", "highdicom", "pydicom", "PIL", "urllib3", "grpc")

# pynetdicom logs ERROR lines of its own for every association that fails on
# the sending side (two per refused connection, each retry); the outbox says
# what failed, once per change (dicom_node/send/outbox.py), so these go to DEBUG.
_PYNETDICOM_SEND_ERRORS = (
    "Association request failed: unable to connect to remote",
    "TCP Initialisation Error",
    "Connection closed while waiting for DIMSE message",
    "DIMSE timeout reached while waiting for message response",
    "No presentation context for",
)


class _DemotePynetdicomSendErrors(logging.Filter):
    """Handler filter: pynetdicom's per-association send errors become
    DEBUG records, shown only when the node logs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom") or record.levelno < logging.WARNING:
            return True
        text = record.getMessage() if isinstance(record.msg, str) else ""
        if record.name == "pynetdicom.transport" or text.startswith(_PYNETDICOM_SEND_ERRORS):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(
            "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"))
    handler.addFilter(_DemotePynetdicomSendErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Their warnings are what an operator needs, at any level of the node's own.
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


class RepeatLog:
    """Log a recurring failure once, then count it.

    A loop that fails the same way every 0.5 s (a full disk, a locked
    database) would fill the log with identical tracebacks.  The first
    occurrence of a key is logged (with its traceback when given); repeats
    are counted and summarised at most every ``every_s``; ``clear`` logs how
    many there were once the loop works again.
    """

    def __init__(self, logger: logging.Logger, level: int = logging.ERROR, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.level = level
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [count since the last line, total, time of the last line]
        self._seen: dict[str, list[float]] = {}

    def report(self, message: str, key: str | None = None, exc_info: bool = False) -> bool:
        """Record one occurrence; True when a line was written."""
        key = message if key is None else key
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                self._seen[key] = [0, 1, now]
                first = True
            else:
                entry[0] += 1
                entry[1] += 1
                if now - entry[2] < self.every_s:
                    return False
                count, entry[0], entry[2] = entry[0], 0, now
                first = False
        if first:
            self.logger.log(self.level, "%s", message, exc_info=exc_info)
        else:
            self.logger.log(self.level, "%s (again %d times in the last %.0f s)",
                            message, count, self.every_s)
        return True

    def clear(self, what: str = "recovered") -> None:
        """The loop works again: say so once for each failure that was reported."""
        with self._lock:
            seen, self._seen = self._seen, {}
        for key, (_, total, _) in seen.items():
            self.logger.info("%s after %d failures: %s", what, int(total), key)
