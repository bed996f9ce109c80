"""Warnings attributed to the user's line, however deep in the library they arise."""

import os
import sys
import warnings

import torch

# torch's frames too: its no_grad and compile wrappers sit between reduce and its caller
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules[__package__], torch)
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warnings.warn` at the first calling frame outside pyro_bmr and torch."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
