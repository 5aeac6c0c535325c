"""The package's loggers: `accelerate.logging.get_logger`, also usable where no Accelerator exists.

In a run, a message is logged by the main process only (``main_process_only=True``, the default) or by every
process (``main_process_only=False``), as accelerate's adapter decides. Code that may also run without an
Accelerator (data sources, split files, stores used from a script or a test) logs there through the standard logger
of each process that logs, where accelerate's adapter would raise.
"""

from __future__ import annotations

from accelerate.logging import MultiProcessAdapter
from accelerate.logging import get_logger as accelerate_get_logger
from accelerate.state import is_initialized


class _ProcessAwareAdapter(MultiProcessAdapter):
    def log(self, level, msg, *args, **kwargs):
        # stacklevel: the record names the caller's line, not this wrapper's
        if is_initialized():  # an Accelerator exists: accelerate knows the processes
            super().log(level, msg, *args, stacklevel=kwargs.pop("stacklevel", 3), **kwargs)
            return
        kwargs.pop("main_process_only", None)
        kwargs.pop("in_order", None)
        self.logger.log(level, msg, *args, stacklevel=kwargs.pop("stacklevel", 2), **kwargs)


def get_logger(name: str) -> MultiProcessAdapter:
    """accelerate's multi-process logger for ``name`` (``ACCELERATE_LOG_LEVEL`` sets its level).

    Args:
        name: the logger's name, ``__name__`` of the calling module.

    Returns:
        A ``MultiProcessAdapter``: ``logger.warning(msg)`` on the main process, ``logger.warning(msg,
        main_process_only=False)`` on each; before any ``Accelerator`` exists, plain logging.
    """
    return _ProcessAwareAdapter(accelerate_get_logger(name).logger, {})
