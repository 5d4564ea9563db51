"""Print how many fuzz cases each entry point got (accepted / rejected with an EsmppError)."""

from __future__ import annotations

from tests.reliability.cases import CASES


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not CASES:
        return
    terminalreporter.section("fuzz cases per entry point")
    for entry_point in sorted({name for name, _ in CASES}):
        accepted, rejected = CASES[(entry_point, "accepted")], CASES[(entry_point, "rejected")]
        terminalreporter.write_line(
            f"{entry_point:<28} {accepted + rejected:>6} cases: {accepted:>5} accepted, {rejected:>5} rejected"
        )
