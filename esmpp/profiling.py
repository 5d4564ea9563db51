"""Named stages of a run, timed and with their peak resident memory, at no cost when nobody listens.

Library code marks its stages with ``with stage("capture"): ...``; that is a no-op unless a caller opened
a :func:`recording`. Time and memory go to the innermost open stage (exclusive), so the stages of a run
add up to its total. Peak memory per stage is exact on Linux: at every stage boundary the kernel's
high-water mark (``VmHWM``) is read and then reset through ``/proc/self/clear_refs``. Where the reset is
refused the high-water mark is cumulative, an upper bound, and ``exact_peaks`` says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK = "5"  # clear_refs command that sets VmHWM to the current RSS (Linux ≥ 4.0)
Item = TypeVar("Item")


def resident_bytes(field_name: str = "VmRSS") -> int:
    """A memory field of this process from /proc/self/status (``VmRSS`` now, ``VmHWM`` peak) in bytes;
    0 where /proc is unavailable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK)
    except OSError:
        return False
    return True


@dataclass
class StageProfile:
    """Per-stage totals: ``seconds[name]`` (summed over entries) and ``peak_bytes[name]`` (max RSS)."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    exact_peaks: bool = True
    _open: list[str] = field(default_factory=list)
    _since: float = 0.0

    def _close_interval(self) -> None:
        """Attribute the time and peak since the last boundary to the innermost open stage, then reset."""
        now = time.perf_counter()
        if self._open:
            name = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), resident_bytes("VmHWM"))
        self.exact_peaks = _reset_peak() and self.exact_peaks
        self._since = time.perf_counter()

    def enter(self, name: str) -> None:
        self._close_interval()
        self._open.append(name)

    def exit(self) -> None:
        self._close_interval()
        self._open.pop()


_active: ContextVar[StageProfile | None] = ContextVar("esmpp_stage_profile", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark the enclosed code as stage ``name`` of the active recording (nothing happens without one)."""
    profile = _active.get()
    if profile is None:
        yield
        return
    profile.enter(name)
    try:
        yield
    finally:
        profile.exit()


def staged(name: str, items: Iterator[Item]) -> Iterator[Item]:
    """``items``, the work of producing each one (a generator's body up to its ``yield``) in stage ``name``."""
    end = object()
    while True:
        with stage(name):
            item = next(items, end)
        if item is end:
            return
        yield item  # type: ignore[misc]


@contextmanager
def recording() -> Iterator[StageProfile]:
    """Record the stages run inside the block into the yielded :class:`StageProfile`."""
    profile = StageProfile()
    token = _active.set(profile)
    try:
        with stage("other"):
            yield profile
    finally:
        _active.reset(token)
