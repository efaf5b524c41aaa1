"""The ``fedinfer`` command.

Sub-commands are contributed by the subpackages: each exposes
``register(subparsers)`` adding its parsers, with ``func`` set to a callable
taking the parsed namespace and returning an exit code. ``simulate`` is the
exception: it hands its arguments to Hydra unchanged, so every Hydra override,
``-m`` multirun and ``hydra.run.dir=...`` works as Hydra users expect.

User mistakes (:class:`fedinfer.errors.FedInferError`) become one line on
stderr and exit code 2, with a hint to ``--help``; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fedinfer.errors import FedInferError

__all__ = ["main"]

# Modules that contribute sub-commands through `register(subparsers)`, by command.
# Only the module owning the command being run is imported (the privacy module
# alone pulls in torch and Opacus: seconds), all of them only for `fedinfer --help`.
_COMMAND_MODULES: dict[str, str] = {
    "privacy": "fedinfer.privacy.commands",
    "keys": "fedinfer.crypto.commands",
    **dict.fromkeys(("serve", "predict", "models", "tokens", "audit"), "fedinfer.serving.commands"),
    **dict.fromkeys(("report", "sweep"), "fedinfer.reporting.commands"),
    **dict.fromkeys(
        ("certs", "coordinator", "site", "deploy", "status"), "fedinfer.deploy.commands"
    ),
}


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedinfer",
        description="Federated learning and federated inference with DP and secure aggregation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.add_parser(
        "simulate",
        help="run a federation in Flower's simulation runtime (Hydra overrides follow)",
        add_help=False,
    )
    wanted = _COMMAND_MODULES.get(command or "")
    modules = [wanted] if wanted else list(dict.fromkeys(_COMMAND_MODULES.values()))
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # that part of fedinfer is not installed / not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedinfer`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "simulate":
        from fedinfer.simulation.hydra_main import hydra_simulate

        return hydra_simulate(args[1:])
    parser = _build_parser(args[0] if args else None)
    namespace = parser.parse_args(args)
    if namespace.command is None:
        parser.print_help()
        return 2
    try:
        return int(namespace.func(namespace) or 0)
    except FedInferError as exc:
        print(f"fedinfer {namespace.command}: error: {exc}", file=sys.stderr)
        print(f"Try 'fedinfer {namespace.command} --help'.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
