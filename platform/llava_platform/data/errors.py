"""The base of every error a single bad sample can cause.

The data pipeline catches ``SampleError`` once and quarantines the record under ``reason``; the
server turns it into a 4xx. Subclasses live next to the code that raises them (``images.py``,
``conversation.py``).
"""


class SampleError(ValueError):
    """A sample that cannot be used. ``reason`` is a short stable code for quarantine counts."""

    reason = "bad_sample"
