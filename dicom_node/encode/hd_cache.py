"""Memoised look-ups in highdicom's tables of the standard.

highdicom answers "is attribute X in the IOD of SOP class Y?" by scanning
every attribute of every module of the IOD, each time it is asked: about 8 ms
a question on a 2-core machine, asked several times for every SR, SC and SEG
it builds (``ContentDate`` and ``ContentTime`` for the document, pixel data for
every source image, multi-frame for every referenced region).  The answers
are pure functions of highdicom's static tables, so they are cached here, with
the same results and the same exceptions (an unknown SOP class still raises
``KeyError``: exceptions are not cached).

``install()`` is idempotent; the encoders call it on import.  The tables
themselves (JSON, about 0.6 s to parse once per process) can be loaded ahead
of the first job with ``warm()``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import lru_cache

import highdicom  # noqa: F401 - imports every highdicom module that binds the names below
import highdicom._standard_utils as _su

__all__ = ["install", "warm"]

_ORIGINAL = {name: getattr(_su, name) for name in
             ("is_attribute_in_iod", "does_iod_have_pixel_data", "get_module_usage")}


@lru_cache(maxsize=4096)
def _in_iod(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
    return _ORIGINAL["is_attribute_in_iod"](attribute, sop_class_uid,
                                            exclude_path_elements=None if exclude is None else list(exclude))


def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                        exclude_path_elements: Sequence[str] | None = None) -> bool:
    exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
    return _in_iod(str(attribute), str(sop_class_uid), exclude)


@lru_cache(maxsize=1024)
def _has_pixels(sop_class_uid: str) -> bool:
    return _ORIGINAL["does_iod_have_pixel_data"](sop_class_uid)


def does_iod_have_pixel_data(sop_class_uid: str) -> bool:
    return _has_pixels(str(sop_class_uid))


@lru_cache(maxsize=4096)
def _usage(module_key: str, sop_class_uid: str):  # type: ignore[no-untyped-def]
    return _ORIGINAL["get_module_usage"](module_key, sop_class_uid)


def get_module_usage(module_key: str, sop_class_uid: str):  # type: ignore[no-untyped-def]
    return _usage(str(module_key), str(sop_class_uid))


_REPLACEMENTS = {"is_attribute_in_iod": is_attribute_in_iod,
                 "does_iod_have_pixel_data": does_iod_have_pixel_data,
                 "get_module_usage": get_module_usage}


def install() -> None:
    """Rebind highdicom's names (in every highdicom module that imported
    them) to the memoised versions."""
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "highdicom" or module_name.startswith("highdicom.")):
            continue
        for name, original in _ORIGINAL.items():
            if getattr(module, name, None) is original:
                setattr(module, name, _REPLACEMENTS[name])


def warm() -> None:
    """Parse highdicom's tables of the standard now rather than in the first job."""
    _su.get_sop_class_iod_map()
    _su.get_iod_module_map()
    _su.get_module_attribute_map()


install()
