"""Where in the code an operation was issued: the innermost frame outside torch (and outside the rehearsal itself),
with the innermost frame of this project when that one is megatron-core's."""

from __future__ import annotations

import dataclasses
import linecache
import os
import sys

import torch

_here = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_REHEARSAL_DIR = _here + os.sep
_PROJECT_DIR = os.path.dirname(os.path.dirname(_here)) + os.sep  # the directory holding k2_megatron/
_STDLIB = os.path.dirname(os.__file__) + os.sep
# frames that only pass a call on: torch, the rehearsal itself, decorators (contextlib, functools, typing_extensions)
_SKIPPED = (_TORCH_DIR, _REHEARSAL_DIR, _STDLIB + "contextlib.py", _STDLIB + "functools.py")
_SKIPPED_NAMES = ("typing_extensions.py",)


@dataclasses.dataclass(frozen=True)
class Site:
    """A source location: file (relative to its package root when known), line, function, and the line's text."""

    file: str
    line: int
    function: str
    code: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"

    def matches(self, file_suffix: str, function: str | None = None) -> bool:
        return self.file.endswith(file_suffix) and (function is None or self.function == function)


@dataclasses.dataclass(frozen=True)
class CallSite:
    """``issuer``: the innermost frame outside torch and the rehearsal (megatron-core or ours); ``ours``: the innermost
    frame of this project's package (k2_megatron, tests, examples, tools), or None."""

    issuer: Site
    ours: Site | None

    def __str__(self) -> str:
        if self.ours is None or self.ours == self.issuer:
            return str(self.issuer)
        return f"{self.issuer}, called from {self.ours}"

    def matches(self, file_suffix: str, function: str | None = None) -> bool:
        return self.issuer.matches(file_suffix, function) or (self.ours is not None and
                                                              self.ours.matches(file_suffix, function))


_SITE_PACKAGES = os.sep + "site-packages" + os.sep


def _is_ours(filename: str) -> bool:
    # a virtualenv may live inside the checkout (CI's ./.venv): its packages are not ours
    return filename.startswith(_PROJECT_DIR) and _SITE_PACKAGES not in filename and \
        not filename.startswith(_REHEARSAL_DIR)


def _short(filename: str) -> str:
    if _SITE_PACKAGES in filename:
        return filename.split(_SITE_PACKAGES, 1)[1]
    if filename.startswith(_PROJECT_DIR):
        return filename[len(_PROJECT_DIR):]
    return filename


_SKIP, _THEIRS, _OURS = 0, 1, 2
_kinds: dict = {}  # code object -> _SKIP / _THEIRS / _OURS (per code object: this runs for every collective)


def _kind(code) -> int:
    kind = _kinds.get(code)
    if kind is None:
        if code.co_filename.startswith("<"):  # "<frozen runpy>", "<string>": no file of ours
            kind = _THEIRS
        else:
            filename = os.path.abspath(code.co_filename)
            kind = (_SKIP if filename.startswith(_SKIPPED) or filename.endswith(_SKIPPED_NAMES)
                    else _OURS if _is_ours(filename) else _THEIRS)
        _kinds[code] = kind
    return kind


def _site(frame) -> Site:
    code = frame.f_code
    return Site(_short(os.path.abspath(code.co_filename)), frame.f_lineno, code.co_name,
                linecache.getline(code.co_filename, frame.f_lineno).strip())


def call_site(skip: int = 1) -> CallSite:
    """The CallSite of the caller's caller chain (frames of torch and of k2_megatron.rehearsal skipped)."""
    frame = sys._getframe(skip)
    issuer = ours = None
    while frame is not None:
        kind = _kind(frame.f_code)
        if kind != _SKIP:
            if issuer is None:
                issuer = _site(frame)
            if kind == _OURS:
                ours = issuer if issuer.line == frame.f_lineno and issuer.function == frame.f_code.co_name \
                    else _site(frame)
                break
        frame = frame.f_back
    if issuer is None:
        issuer = Site("<unknown>", 0, "<unknown>", "")
    return CallSite(issuer, ours)
