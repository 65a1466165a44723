"""What a job's console may not hold: Python warnings, Ray's C++ error lines, Ray Data's "will hang" notice."""

from __future__ import annotations

import re

NOISE = {
    "a Python warning": re.compile(r"\b\w*(Warning|Deprecation)\b: "),
    "an E-level C++ log line": re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} E \d+ \d+\] "),
    "a will-hang notice": re.compile(r"will hang"),
    "a library's progress bar": re.compile(r"\d+%\|[█▏▎▍▌▋▊▉ ]*\|"),
}
"""Each kind of line a person cannot act on, as it is recognised."""


def noise(console: str) -> list[str]:
    """``kind: line`` of every console line that is noise (``NOISE``)."""
    return [f"{kind}: {line}" for line in console.splitlines() for kind, pattern in NOISE.items()
            if pattern.search(line)]
