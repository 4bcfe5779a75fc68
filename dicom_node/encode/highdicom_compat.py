"""The one place that touches highdicom's private internals: memoised
look-ups in its tables of the standard (``highdicom._standard_utils``), and
two shortcuts in building an SR (``highdicom.sr``).

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

An SR document's constructor deep-copies the content tree it is given (about
a quarter of a 64-slice CT report's cost), because a caller might change the
tree afterwards.  ``content_handed_over(tree)`` tells it, for one build on
this thread, that the caller will not: that tree is used as it is, and any
other deep copy is still made.  Collecting the evidence searches the tree
for image and composite references with ``find_content_items``, which builds
a new content item and coded concept for every node it visits (another
quarter); ``find_content_items`` below answers a search without a name the
same way by reading the value and relationship types, and hands a search by
name to highdicom's own.  tests/test_pipeline_speedups.py builds the SRs
with and without both and compares them element for element.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import highdicom  # imports every highdicom module that binds the names below
import highdicom._standard_utils as _su
import highdicom.sr.sop as _sr_sop
import highdicom.sr.utils as _sr_utils
from highdicom.sr.enum import RelationshipTypeValues, ValueTypeValues
from pydicom import Dataset

__all__ = ["CompatError", "SUPPORTED", "check", "content_handed_over", "find_content_items", "install", "warm"]

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
    # The SR shortcuts rebind names these modules look up at call time.
    if getattr(_sr_sop, "deepcopy", None) not in (copy.deepcopy, _deepcopy):
        raise CompatError(f"highdicom {highdicom.__version__}: highdicom.sr.sop no longer copies with "
                          "copy.deepcopy. Update dicom_node/encode/highdicom_compat.py.")
    finder = getattr(_sr_utils, "find_content_items", None)
    find_params = list(inspect.signature(finder).parameters) if callable(finder) else None
    if find_params != _FIND_PARAMETERS:
        raise CompatError(f"highdicom {highdicom.__version__}: sr.utils.find_content_items is "
                          f"{'gone' if find_params is None else f'now ({find_params})'}, expected ({_FIND_PARAMETERS}). "
                          "Update dicom_node/encode/highdicom_compat.py.")


_FIND_PARAMETERS = ["dataset", "name", "value_type", "relationship_type", "recursive"]
# ids of the content tree (and of its root item) handed over for this build.
_HANDED_OVER: ContextVar[frozenset[int]] = ContextVar("highdicom_compat_handed_over", default=frozenset())


def _deepcopy(x: Any, memo: dict[int, Any] | None = None) -> Any:
    if memo is None and id(x) in _HANDED_OVER.get():
        return x
    return copy.deepcopy(x, memo)


check()

_ORIGINAL = {name: getattr(_su, name) for name in
             ("is_attribute_in_iod", "does_iod_have_pixel_data", "get_module_usage")}
_ORIGINAL_FIND = _sr_utils.find_content_items


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


@contextmanager
def content_handed_over(content: Dataset | Sequence[Dataset]) -> Iterator[None]:
    """While an SR is built from ``content`` on this thread, highdicom uses
    the tree as it is instead of a deep copy; the caller must not change
    ``content`` afterwards (the SR shares it)."""
    ids = {id(content)}
    if not isinstance(content, Dataset) and len(content) == 1:
        ids.add(id(content[0]))  # highdicom unwraps a one-item sequence before copying
    token = _HANDED_OVER.set(frozenset(ids))
    try:
        yield
    finally:
        _HANDED_OVER.reset(token)


def find_content_items(dataset: Dataset, name: Any = None, value_type: ValueTypeValues | str | None = None,
                       relationship_type: RelationshipTypeValues | str | None = None,
                       recursive: bool = False) -> list[Dataset]:
    """highdicom's ``find_content_items``, the same items in the same order
    (depth first, each item before its children)."""
    if name is not None:
        return _ORIGINAL_FIND(dataset, name, value_type, relationship_type, recursive)
    if not hasattr(dataset, "ContentSequence"):
        raise AttributeError("Data set does not contain a Content Sequence attribute.")
    wanted_value = None if value_type is None else ValueTypeValues(value_type)
    wanted_relationship = None if relationship_type is None else RelationshipTypeValues(relationship_type)
    found: list[Dataset] = []
    pending = [iter(dataset.ContentSequence)]
    while pending:
        item = next(pending[-1], None)
        if item is None:
            pending.pop()
            continue
        # Converting raises on a value the standard does not define, as highdicom's does.
        value = ValueTypeValues(item.ValueType)
        relationship = item.get("RelationshipType")
        relationship = None if relationship is None else RelationshipTypeValues(relationship)
        if wanted_value in (None, value) and (wanted_relationship is None or relationship == wanted_relationship):
            found.append(item)
        if recursive and hasattr(item, "ContentSequence"):
            pending.append(iter(item.ContentSequence))
    return found


_REPLACEMENTS = {"is_attribute_in_iod": is_attribute_in_iod,
                 "does_iod_have_pixel_data": does_iod_have_pixel_data,
                 "get_module_usage": get_module_usage,
                 "find_content_items": find_content_items}


def install() -> None:
    """Rebind highdicom's names (in every highdicom module that imported
    them) to the memoised and shortcut versions."""
    originals = {**_ORIGINAL, "find_content_items": _ORIGINAL_FIND}
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "highdicom" or module_name.startswith("highdicom.")):
            continue
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                setattr(module, name, _REPLACEMENTS[name])
    _sr_sop.deepcopy = _deepcopy  # type: ignore[attr-defined,assignment]


def warm() -> None:
    """Parse highdicom's tables of the standard now rather than in the first job."""
    for name in _TABLES:
        getattr(_su, name)()


install()
