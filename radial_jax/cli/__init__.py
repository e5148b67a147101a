"""The `radial-jax` command line: one subcommand per job, each with --help.

One module per subcommand in this package, each with `add_parser(subparsers)` that registers its
parser and sets `func=run` (and `interrupted`, a note on what Ctrl-C leaves behind). Adding a
subcommand is one module plus one name in SUBCOMMANDS. This package is the only part of
radial_jax/ that imports models/, convert/ or train/, and it does so inside the `run` functions,
so `radial-jax mask --help` loads neither flax nor the model.
"""

import argparse
import contextlib
import importlib
import signal
import sys
from collections.abc import Iterator

SUBCOMMANDS = ("mask", "demo", "convert", "generate", "prepare", "train", "export")  # module names under radial_jax/cli/, in --help order
EXIT_ERROR = 2  # argparse's own code for a bad argument
EXIT_INTERRUPTED = 128  # + the signal number, as shells report it: 130 for Ctrl-C, 143 for SIGTERM


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that cleanup (with / finally) runs as for Ctrl-C."""

    signum = signal.SIGTERM


def build_parser() -> argparse.ArgumentParser:
    """Returns the `radial-jax` parser with every subcommand of SUBCOMMANDS."""
    parser = argparse.ArgumentParser(prog="radial-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum, frame):
        raise Interrupted()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; returns its exit code: 2 with a one-line error for a bad argument or
    file, 130 (Ctrl-C) or 143 (SIGTERM) with a one-line note on what was kept."""
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_raises():
            return args.func(args)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        note = getattr(args, "interrupted", None)  # a subcommand that sets none claims nothing about its files
        print(f"radial-jax {args.command}: interrupted ({signal.Signals(signum).name})"
              + (f"; {note.format(**vars(args))}" if note else ""), file=sys.stderr)
        return EXIT_INTERRUPTED + signum
    except (ValueError, OSError) as e:
        print(f"radial-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
