"""Warnings attributed to the user's line, however deep in the library they arise."""

import sys
import warnings

# torch's frames too: its no_grad and compile wrappers sit between reduce and its
# caller; and mutmut's, whose trampolines wrap every function under mutation testing
_INTERNAL = frozenset({__package__, "torch", "mutmut"})


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warnings.warn` at the first calling frame outside :data:`_INTERNAL`'s
    packages."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _package(frame) in _INTERNAL:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def _package(frame) -> str:
    return frame.f_globals.get("__name__", "").partition(".")[0]
