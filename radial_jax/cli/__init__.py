"""The `radial-jax` command line: one subcommand per job, each with --help.

One module per subcommand in this package, each with `add_parser(subparsers)` that registers its
parser and sets `func=run`. Adding a subcommand is one module plus one name in SUBCOMMANDS. This
package is the only part of radial_jax/ that imports models/, convert/ or train/, and it does so
inside the `run` functions, so `radial-jax mask --help` loads neither flax nor the model.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = ("mask", "demo", "convert", "generate", "prepare", "export")  # module names under radial_jax/cli/, in --help order


def build_parser() -> argparse.ArgumentParser:
    """Returns the `radial-jax` parser with every subcommand of SUBCOMMANDS."""
    parser = argparse.ArgumentParser(prog="radial-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; returns its exit code (2 with a one-line error for a bad argument)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"radial-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
