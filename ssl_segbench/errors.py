"""The one base class of every expected failure: bad input, bad configuration, missing data. The CLI turns these into a
message and exit status 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class SegbenchError(Exception):
    """An expected failure; the message names the file or parameter at fault and the fix."""
