"""Fuzz bookkeeping: every case goes through :func:`attempt`, which enforces the contract (works, or raises
``EsmppError``, within a time limit) and counts the outcome per entry point for the session summary."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from esmpp.errors import EsmppError

T = TypeVar("T")

# (entry point, "accepted" | "rejected") → number of cases tried in this session.
CASES: Counter[tuple[str, str]] = Counter()
# Generous for tiny inputs: a case that takes longer is a hang (e.g. a decompression bomb being decoded).
TIME_LIMIT_S = 20


class HangError(Exception):
    """Raised inside a case that ran past ``TIME_LIMIT_S``."""


def _alarm(signum: int, frame: Any) -> None:
    raise HangError(f"the case ran for more than {TIME_LIMIT_S} s")


def attempt(entry_point: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T | EsmppError:
    """``call(*args, **kwargs)``: its result, or the ``EsmppError`` it raised. Any other exception (or a hang,
    as ``HangError``) propagates and fails the test."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        result = call(*args, **kwargs)
    except EsmppError as exc:
        CASES[(entry_point, "rejected")] += 1
        return exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    CASES[(entry_point, "accepted")] += 1
    return result
