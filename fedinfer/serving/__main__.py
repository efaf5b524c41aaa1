"""``python -m fedinfer.serving COMMAND``: the serving sub-commands without the rest of the CLI.

Same commands, options and error handling as ``fedinfer serve|predict|models|tokens|audit``,
but it imports only the serving side, so a site server subprocess starts in a few seconds
instead of paying for Flower/Ray/Opacus imports it never uses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedinfer.errors import FedInferError
from fedinfer.serving.commands import register


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one serving sub-command; user errors exit with code 2."""
    parser = argparse.ArgumentParser(prog="fedinfer")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    namespace = parser.parse_args(argv)
    try:
        return int(namespace.func(namespace) or 0)
    except FedInferError as exc:
        print(f"fedinfer {namespace.command}: error: {exc}", file=sys.stderr)
        print(f"Try 'fedinfer {namespace.command} --help'.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
