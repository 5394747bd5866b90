"""What every command-line tool of orepa_mm shares: one logger and one
exit-code convention.

* Progress goes through mmengine's logger (:func:`log`), so the tools read
  like the OpenMMLab tools around them; a tool's final result (a summary, a
  table) is printed to stdout, where a script can read it.
* A user error (bad arguments, a missing or unusable file, a config that
  does not fit) is one line, ``<tool>: error: <what is wrong>``, and exit
  status 2 (the status argparse uses for bad arguments); nothing is written.
  Anything else is a bug and keeps its traceback (status 1).
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, Optional, Sequence

from mmengine.logging import MMLogger, print_log

from .checkpoint import CheckpointError

__all__ = ['ToolError', 'EXIT_USER_ERROR', 'EXIT_STATUS_HELP', 'get_logger', 'log', 'tool_main',
           'keep_parameter_lines_off_console']

#: Exit status of every tool for a user error.
EXIT_USER_ERROR = 2
#: The ``--help`` epilog that documents the convention.
EXIT_STATUS_HELP = ('exit status: 0 on success; 2 on a user error (bad arguments or input: one message says '
                    'what is wrong, nothing is written); 1 on an unexpected failure (a bug: please report it)')


class ToolError(Exception):
    """A user error in a tool's input; the message says what is wrong."""


#: Errors that a tool reports as one line with :data:`EXIT_USER_ERROR`.
USER_ERRORS = (ToolError, CheckpointError)


class _CurrentStdout:
    """Writes to whatever ``sys.stdout`` is at the time of writing, so that a
    long-lived logger follows redirections (pytest's capture, notebooks)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def get_logger() -> MMLogger:
    """The logger of orepa_mm's tools (console, INFO)."""
    if MMLogger.check_instance_created('orepa_mm'):
        return MMLogger.get_instance('orepa_mm')
    logger = MMLogger.get_instance('orepa_mm', log_level='INFO')
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler and handler.stream is sys.stdout:
            handler.setStream(_CurrentStdout())
    return logger


class _NoParameterLines(logging.Filter):
    """Drops mmengine's one-line-per-parameter ``paramwise_options -- ...``
    records: with ``custom_keys`` or bias multipliers it logs one per matching
    parameter, hundreds for a detector, before training starts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('paramwise_options')


def keep_parameter_lines_off_console(logger: logging.Logger) -> None:
    """Keep ``logger``'s (a Runner's) per-parameter optimizer lines out of the
    console; its log file still gets them.  Idempotent."""
    for handler in logger.handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _NoParameterLines) for f in handler.filters):
            handler.addFilter(_NoParameterLines())


def log(message: str) -> None:
    """Log ``message`` at INFO through the tools' logger."""
    print_log(message, logger=get_logger())


def tool_main(prog: str) -> Callable[[Callable[[Optional[Sequence[str]]], None]], Callable[..., int]]:
    """Decorate a tool's ``main(argv)`` so that it returns the exit status:
    0, or :data:`EXIT_USER_ERROR` after printing ``<prog>: error: <message>``
    to stderr for a user error."""
    def wrap(fn: Callable[[Optional[Sequence[str]]], None]) -> Callable[..., int]:
        @functools.wraps(fn)
        def main(argv: Optional[Sequence[str]] = None) -> int:
            try:
                fn(argv)
            except USER_ERRORS as e:
                print(f'{prog}: error: {e}', file=sys.stderr)
                return EXIT_USER_ERROR
            return 0
        return main
    return wrap
