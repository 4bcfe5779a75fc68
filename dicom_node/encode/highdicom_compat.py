"""The one place that touches highdicom's private internals: memoised
look-ups in its tables of the standard (``highdicom._standard_utils``).

highdicom answers "is attribute X in the IOD of SOP class Y?" by scanning
every attribute of every module of the IOD, each time it is asked: about 8 ms
a question on a 2-core machine, asked several times for every SR, SC and SEG
it builds (``ContentDate`` and ``ContentTime`` for the document, pixel data for
every source image, multi-frame for every referenced region).  The answers
are pure functions of highdicom's static tables, so they are cached here, with
the same results and the same exceptions (an unknown SOP class still raises
``KeyError``: exceptions are not cached).

``check()`` runs at import and fails loudly (``CompatError``) when the
private functions are gone or their signatures changed, so a highdicom
upgrade cannot make the patch silently wrong.  ``install()`` is idempotent;
the encoders call it on import (memoisation changes no answer, only its cost).
The tables themselves (JSON, about 0.6 s to parse once per process) can be
loaded ahead of the first job with ``warm()``.  Upstreamable: a cache in
highdicom's own ``is_attribute_in_iod`` would make this module unnecessary.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import highdicom  # imports every highdicom module that binds the names below
import highdicom._standard_utils as _su

__all__ = ["CompatError", "SUPPORTED", "check", "install", "warm"]

# highdicom versions whose internals tests/test_pipeline_speedups.py covers;
# pyproject.toml pins the same range.
SUPPORTED = ((0, 28), (0, 30))
# name -> its parameters, as the replacements below assume them.
_SIGNATURES = {
    "is_attribute_in_iod": ["attribute", "sop_class_uid", "exclude_path_elements"],
    "does_iod_have_pixel_data": ["sop_class_uid"],
    "get_module_usage": ["module_key", "sop_class_uid"],
}
_TABLES = ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map")


class CompatError(ImportError):
    """highdicom changed under a patch; the message says which and what."""


def check() -> None:
    version = tuple(int(p) for p in highdicom.__version__.split(".")[:2])
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        raise CompatError(f"highdicom {highdicom.__version__}: supported {SUPPORTED[0]} <= version < "
                          f"{SUPPORTED[1]}. Update dicom_node/encode/highdicom_compat.py.")
    for name, params in _SIGNATURES.items():
        fn = getattr(_su, name, None)
        found = list(inspect.signature(fn).parameters) if callable(fn) else None
        if found != params:
            raise CompatError(f"highdicom {highdicom.__version__}: _standard_utils.{name} is "
                              f"{'gone' if found is None else f'now ({found})'}, expected ({params}). "
                              "Update dicom_node/encode/highdicom_compat.py.")
    missing = [name for name in _TABLES if not callable(getattr(_su, name, None))]
    if missing:
        raise CompatError(f"highdicom {highdicom.__version__}: _standard_utils.{missing} are gone. "
                          "Update dicom_node/encode/highdicom_compat.py.")


check()

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
def _usage(module_key: str, sop_class_uid: str) -> Any:
    return _ORIGINAL["get_module_usage"](module_key, sop_class_uid)


def get_module_usage(module_key: str, sop_class_uid: str) -> Any:
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
    for name in _TABLES:
        getattr(_su, name)()


install()
