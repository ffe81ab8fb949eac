"""A small secret file (tokens, keys) read once and again only when it changes.

Used by the Rank port's bearer tokens (serving/security.py) and the Triton client key
(infra/triton_access.py): both are rotated by rewriting a mounted file, and both are consulted
on every call, so a read per call would cost a file open on the hot path. ``WatchedFile.value``
costs one ``stat`` when nothing changed.

A change is seen through the file's stamp (mtime, ctime, size, inode). File times tick coarsely
(milliseconds on most filesystems): a file rewritten twice within one tick with the same size
looks unchanged, so a file changed in the last ``RACY_NS`` is read on every call until it has
aged (git's index has the same "racy" rule).

At construction an unreadable or invalid file is an error (fail at start). Later, an unreadable
file or content that ``parse`` refuses (a half-written file, an empty Secret during an update)
leaves the value in force, with a warning: a rotation mistake never locks every caller out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
RACY_NS = 2_000_000_000  # a file changed this recently is read again on every call


class WatchedFile(Generic[T]):
    """``parse(text)`` of the file at ``path``, parsed again when the file changes (module docstring).

    ``parse`` raises ValueError for content it refuses; ``what`` names the file in messages
    ("token file", "Triton key file").
    """

    def __init__(self, path: str | os.PathLike, parse: Callable[[str], T], what: str = "file") -> None:
        self.path = Path(path)
        self.parse, self.what = parse, what
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._value: T
        try:
            st = os.stat(self.path)
            text = self.path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read the {what} {self.path}: {e.strerror or e}") from e
        self._value = self._parse(text)
        self._stamp = _stamp(st)

    def _parse(self, text: str) -> T:
        try:
            return self.parse(text)
        except ValueError as e:
            raise ValueError(f"the {self.what} {self.path}: {e}") from e

    def value(self) -> T:
        """The value in force, after a ``stat`` that re-reads the file if it changed."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            log.warning("%s %s unreadable (%s): the value in force stays", self.what, self.path, e)
            return self._value
        stamp = _stamp(st)
        if stamp == self._stamp and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            return self._value
        with self._lock:
            try:
                text = self.path.read_text()
                value = self._parse(text)
            except (OSError, ValueError) as e:
                log.warning("%s %s not taken (%s): the value in force stays", self.what, self.path, e)
                return self._value
            if value != self._value:
                log.info("%s %s changed: the new value is in force", self.what, self.path)
            self._value, self._stamp = value, stamp
        return self._value


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
