"""`pad-moe`: the argument parser, logging set-up and error handling shared by all subcommands.

Exit codes: 0 success; 2 bad input (an argparse error, or a `CLIError`: missing path, not a PAD
checkpoint, no samples, ...); 1 a library call failed (e.g. a corrupt checkpoint, a `ValueError`
from the config validation); 130 interrupted. Errors are one line on stderr,
``pad-moe <command>: error: <message>``; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging as std_logging
import sys
import traceback
from collections.abc import Iterator, Sequence

from transformers.utils import logging

from ._common import CLIError

PACKAGE_LOGGER = "pad_moe_transformers"


class _StderrHandler(std_logging.StreamHandler):
    """A handler that writes to the current `sys.stderr` (also when it is replaced, e.g. by pytest)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output (-v: debug messages and Transformers' info; -vv: also tracebacks).",
    )
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars.")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The `pad-moe` parser with its `convert`, `inspect`, `analyze` and `export` subcommands."""
    from .._version import __version__
    from . import analyze, convert, export, inspect

    parser = argparse.ArgumentParser(
        prog="pad-moe",
        description="PAD-MoE (partially dynamic Mixture-of-Experts, PAD-Net) tools for BERT-family checkpoints: "
        "convert a dense checkpoint, inspect a PAD-MoE checkpoint, analyze dynamic properties, export to ONNX. "
        "`pad-moe COMMAND --help` describes each command; docs/cli.md has examples.",
        epilog="exit codes: 0 ok, 2 bad input, 1 a library call failed.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    common = _common_options()
    for module in (convert, inspect, analyze, export):
        module.add_parser(subparsers, parents=[common])
    return parser


@contextlib.contextmanager
def _logging_setup(verbose: int, quiet: bool) -> Iterator[None]:
    """Route the package's log records (transformers.utils.logging loggers under `pad_moe_transformers`) to
    stderr at the requested level, set Transformers' verbosity and progress bars; all restored on exit."""
    package = logging.get_logger(PACKAGE_LOGGER)
    handler = _StderrHandler()
    handler.setFormatter(std_logging.Formatter("[%(levelname)s] %(message)s"))
    before = (package.level, logging.get_verbosity(), logging.is_progress_bar_enabled())
    package.addHandler(handler)
    package.setLevel(std_logging.WARNING if quiet else std_logging.DEBUG if verbose else std_logging.INFO)
    logging.set_verbosity(std_logging.ERROR if quiet else std_logging.INFO if verbose else std_logging.WARNING)
    if quiet:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(before[0])
        logging.set_verbosity(before[1])
        if before[2]:
            logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run `pad-moe` with `argv` (default `sys.argv[1:]`) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or an argparse error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    prefix = f"{parser.prog} {args.command}: error:"
    with _logging_setup(args.verbose, args.quiet):
        try:
            return int(args.run(args) or 0)
        except CLIError as error:
            print(f"{prefix} {error}", file=sys.stderr)
            if args.verbose > 1:
                traceback.print_exc()
            return 2
        except (ValueError, TypeError, OSError, ImportError, RuntimeError) as error:
            print(f"{prefix} {type(error).__name__}: {error}", file=sys.stderr)
            if args.verbose > 1:
                traceback.print_exc()
            else:
                print(f"{parser.prog} {args.command}: run with -vv for the traceback.", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{parser.prog} {args.command}: interrupted.", file=sys.stderr)
            return 130


def console_main() -> None:
    """Entry point of the `pad-moe` console script."""
    sys.exit(main())
