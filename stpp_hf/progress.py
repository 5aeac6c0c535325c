"""Progress bars that keep logs short: when the bar's stream is not a terminal (a log file, a pipe, a
job scheduler's output), each refresh becomes a line, so the bar refreshes at most every
:data:`NON_TERMINAL_INTERVAL_S` seconds there instead of every step."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

NON_TERMINAL_INTERVAL_S = 10.0


def progress_bar(*, file=None, **kwargs) -> tqdm:
    """``tqdm(file=file, **kwargs)`` with ``mininterval`` raised to :data:`NON_TERMINAL_INTERVAL_S` when
    ``file`` (default ``sys.stderr``) is not a terminal. Call ``set_postfix(..., refresh=False)`` on it:
    a refreshing ``set_postfix`` writes a line per call whatever the interval."""
    stream = sys.stderr if file is None else file
    if not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", NON_TERMINAL_INTERVAL_S)
    return tqdm(file=file, **kwargs)
