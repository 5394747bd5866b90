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
import io
import logging
import sys
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple

from mmengine.logging import MMLogger, print_log

from .checkpoint import CheckpointError

__all__ = ['ToolError', 'EXIT_USER_ERROR', 'EXIT_STATUS_HELP', 'get_logger', 'log', 'tool_main',
           'keep_console_readable', 'build_runner', 'quietly_built']

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


#: Starts of the Runner's per-parameter optimizer lines (``paramwise_options --
#: ...``: one per matching parameter, hundreds for a detector).
_PARAMETER_LINES = ('paramwise_options',)
#: Starts of the Runner's set-up dumps: environment, config, hook order.
_SETUP_DUMPS = ('\n---', 'Config:', 'Hooks will be executed')


class _DropLines(logging.Filter):
    """Drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts: Tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def keep_console_readable(logger: logging.Logger, setup_dumps: bool = False) -> None:
    """Keep ``logger``'s (a Runner's) per-parameter optimizer lines, and with
    ``setup_dumps`` its environment, config and hook-order dumps, off the
    console; its log file still gets everything.  Idempotent."""
    starts = _PARAMETER_LINES + (_SETUP_DUMPS if setup_dumps else ())
    for handler in logger.handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _DropLines) for f in handler.filters):
            handler.addFilter(_DropLines(starts))


def _warnings_to_log_file(logger: logging.Logger, earlier: Sequence[warnings.WarningMessage] = ()) -> None:
    """Send Python warnings (the frameworks' deprecation notices...), from now
    on and ``earlier`` ones, to ``logger``'s log file instead of the console;
    a later call moves them to the new logger's file."""
    logging.captureWarnings(True)
    py_warnings = logging.getLogger('py.warnings')
    py_warnings.propagate = False
    for handler in list(py_warnings.handlers):
        py_warnings.removeHandler(handler)
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    for handler in files or [logging.NullHandler()]:
        py_warnings.addHandler(handler)
    for w in earlier:
        py_warnings.warning(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line).rstrip())


def build_runner(cfg, quiet_setup: bool = False):
    """``Runner.from_cfg(cfg)`` with a readable console (:func:`keep_console_readable`).

    With ``quiet_setup`` the environment and config dumps that the Runner
    logs while it is built, and Python warnings (those of the build itself
    included), go to its log file only (:func:`quietly_built`).
    """
    from mmengine.runner import Runner
    if quiet_setup:
        return quietly_built(lambda: Runner.from_cfg(cfg))
    runner = Runner.from_cfg(cfg)
    keep_console_readable(runner.logger)
    return runner


def quietly_built(build: Callable[[], Any]) -> Any:
    """The Runner that ``build()`` returns (mmengine's, or one another library
    builds, e.g. mmdeploy's test runner), its set-up dumps (environment,
    config, hook order) and Python warnings sent to its log file only: its
    console handler is created writing into a buffer, then pointed at stdout."""
    stdout, sys.stdout = sys.stdout, io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as during_build:  # no log file yet
            runner = build()
    finally:
        buffer, sys.stdout = sys.stdout, stdout
    for handler in runner.logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is buffer:
            handler.setStream(_CurrentStdout())
    _warnings_to_log_file(runner.logger, during_build)
    keep_console_readable(runner.logger, setup_dumps=True)
    return runner


def shutdown_distributed() -> None:
    """Destroy the default process group, if any, before the interpreter exits.

    Left to the interpreter's own teardown, gloo's worker threads can abort a
    process after training has finished ("terminate called without an
    active exception", seen once in a two-process toy run), and torchrun then
    reports the whole run as failed."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
            # Created first, so that a Runner built later is mmengine's "current"
            # logger: the Runner's own lines (and what goes to its log file only)
            # must not land in this console-only logger.
            get_logger()
            try:
                fn(argv)
            except USER_ERRORS as e:
                print(f'{prog}: error: {e}', file=sys.stderr)
                return EXIT_USER_ERROR
            return 0
        return main
    return wrap
