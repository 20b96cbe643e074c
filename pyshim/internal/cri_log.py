"""The CRI container log format kubelet and `crictl logs` read, one line per write:

    <RFC3339Nano timestamp> <stdout|stderr> <P|F> <text>

P marks a partial line (the text continues in the next entry), F a full one. conmon writes this
format; pyshim reads it (for `pyshim logs`) and, for restores, carries old entries into a new log.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class LogFormatError(ValueError):
    pass


@dataclass(frozen=True)
class LogEntry:
    timestamp: str
    stream: str  # "stdout" or "stderr"
    partial: bool
    text: str  # with the newline restored for full lines

    def format(self) -> str:
        body = self.text[:-1] if not self.partial and self.text.endswith("\n") else self.text
        return f"{self.timestamp} {self.stream} {'P' if self.partial else 'F'} {body}\n"


def parse_line(line: str) -> LogEntry:
    parts = line.rstrip("\n").split(" ", 3)
    if len(parts) < 3:
        raise LogFormatError(f"not a CRI log line: {line[:80]!r}")
    timestamp, stream, tag = parts[0], parts[1], parts[2]
    text = parts[3] if len(parts) == 4 else ""
    if stream not in ("stdout", "stderr"):
        raise LogFormatError(f"unknown stream {stream!r} in CRI log line")
    if tag not in ("P", "F"):
        raise LogFormatError(f"unknown tag {tag!r} in CRI log line (expected P or F)")
    partial = tag == "P"
    return LogEntry(timestamp, stream, partial, text if partial else text + "\n")


def read_log(path: Path) -> Iterator[LogEntry]:
    """Entries of a CRI log file; lines that do not parse are skipped, as kubelet does."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield parse_line(line)
            except LogFormatError:
                continue
