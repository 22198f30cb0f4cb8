"""Errors that end the service with a status of its own.

``ConfigurationError`` is what no retry can fix (a wrong password, a CA the broker's
certificate does not chain to, a topic that is missing or too small): ``meterwatch run``
stops and exits with status 2, printing the error as one line,
``meterwatch: error: <flag>: <what is wrong>; <how to fix>``. It subclasses ``ValueError`` so
the CLI's handler of invalid settings prints it the same way. Never put a secret in one.

Everything else that stops a stage is a failure (exit status 1), see ``stream.service``.
"""

from __future__ import annotations

import time

#: A second SIGTERM/SIGINT this soon after the first is the same stop delivered twice, not a
#: request to exit at once: ``timeout`` signals the process and then its process group, a
#: terminal's Ctrl-C reaches every process of the foreground group.
SIGNAL_ECHO_S = 0.5


class ConfigurationError(ValueError):
    """A setting the broker or the cluster refuses; retrying cannot help."""

    def __init__(self, flag: str, problem: str, fix: str) -> None:
        self.flag, self.problem, self.fix = flag, problem, fix
        super().__init__(f"{flag}: {problem}; {fix}")


class PartitionLost(RuntimeError):
    """Another member owns these input partitions now (its producer fenced ours, or the
    group moved on): their pending work is the new owner's to replay."""

    def __init__(self, partitions: set[int], reason: str) -> None:
        self.partitions = set(partitions)
        self.reason = reason
        super().__init__(f"partitions {sorted(partitions)} lost: {reason}")


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none (what a
    one-line error or log line says of it)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def problem_of(exc: BaseException) -> str:
    """What is wrong, from an error whose message reads ``<what is wrong>; <how to fix>``
    (``CheckpointError``, a budget outside the curve's range): the part before the first
    ``;``, for a ``ConfigurationError`` that gives its own fix."""
    return str(exc).split(";")[0]


class StopSignals:
    """SIGTERM/SIGINT as the service counts them: the first stops gracefully, one within
    ``SIGNAL_ECHO_S`` of it is its echo (ignored), a later one exits at once (status 1)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def receive(self) -> str:
        """``"first"``, ``"echo"`` or ``"force"`` for the signal that came now."""
        now = time.monotonic()
        if self.first is None:
            self.first = now
            return "first"
        return "echo" if now - self.first < SIGNAL_ECHO_S else "force"
