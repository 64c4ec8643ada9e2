"""Command line: ``iisan <command>`` or ``python -m iisan <command>``.

This root only assembles the command groups, one module each, in the order data
flows (pyhf's layout): each command parses its arguments, calls the library and
writes its outputs. Heavy imports happen inside the commands, so ``iisan
--version`` stays instant. Any ``IisanError`` becomes a short message on stderr
and exit code 2.

May import every stage (inside command bodies).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from iisan import __version__
from iisan.cli import data, extract, results, train, use
from iisan.cli.common import setup_logging
from iisan.core.errors import IisanError

log = logging.getLogger("iisan")
GROUPS = (data, extract, train, results, use)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iisan", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"iisan {__version__}")
    p.add_argument("--log", help="also write the log to this file")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return p


# what a full or unwritable disk raises, and what to do about it
_WRITE_ERRORS = {errno.ENOSPC: "free space on that disk, or write the outputs elsewhere",
                 errno.EDQUOT: "free space within your quota, or write the outputs elsewhere",
                 errno.EFBIG: "the file is larger than this system allows: write the outputs elsewhere",
                 errno.EROFS: "that file system is read-only: give an output path on a writable one",
                 errno.EACCES: "give an output path you may write to, or change its permissions",
                 errno.EPERM: "give an output path you may write to, or change its permissions"}  # fmt: skip


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log_to = getattr(args, "log_to", None)
    try:
        setup_logging(args.log or (log_to(args) if log_to else None), args.verbose)
        log.info("==== iisan %s %s, attempt started (pid %d): %s", __version__, args.command, os.getpid(),
                 " ".join(sys.argv[1:] if argv is None else argv))  # fmt: skip
        args.func(args)
    except IisanError as e:
        log.error("iisan %s: %s", args.command, e)
        return 2
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        log.error("iisan %s: cannot write %s: %s\n  fix: %s", args.command, e.filename or "an output file",
                  e.strerror, _WRITE_ERRORS[e.errno])  # fmt: skip
        return 2
    return 0
