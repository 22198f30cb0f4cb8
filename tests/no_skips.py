"""pytest plugin for ``make test``: a skipped test fails the run.

Every test proves something the README claims; a skip (a missing tool, a missing broker)
would let the suite pass without proving it. Enabled with ``-p tests.no_skips``; running
single files without it still reports skips the usual way.
"""

from __future__ import annotations

import pytest

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} test(s) skipped; every test must run "
            f"(see the skip reasons above): {', '.join(_skipped[:5])}", red=True)
