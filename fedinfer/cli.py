"""The ``fedinfer`` command.

Sub-commands are contributed by the subpackages: each exposes
``register(subparsers)`` adding its parsers, with ``func`` set to a callable
taking the parsed namespace and returning an exit code. ``simulate`` is the
exception: it hands its arguments to Hydra unchanged, so every Hydra override,
``-m`` multirun and ``hydra.run.dir=...`` works as Hydra users expect.

User mistakes (:class:`fedinfer.errors.FedInferError`) become one line on
stderr and exit code 2, with a hint to ``--help``; never a traceback.

Start-up is kept light: the command modules import torch, Flower and Ray only inside the
functions that run a command, so every ``--help``, ``--version`` and light commands
(``models list``, ``site init-policy``) answer in a fraction of a second
(``bench/cli_startup.py``; ``tests/test_cli_first_hour.py`` checks that torch stays out).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

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


# One metavar vocabulary for every option that has none of its own, by destination, then by
# type: paths are DIR or FILE, counts N, durations SECONDS or MS.
_METAVARS: dict[str, str] = {
    **dict.fromkeys(("host", "serve_host", "coordinator_host"), "HOST"),
    **dict.fromkeys(("port", "serve_port", "link_port"), "PORT"),
    "coordinator": "HOST:PORT",
    **dict.fromkeys(("label_column", "id_column"), "COLUMN"),
    **dict.fromkeys(("name", "principal", "config_name"), "NAME"),
    **dict.fromkeys(("version", "to"), "VERSION"),
    "sites": "NAMES",  # `certs init --sites a,b,c`; an int-typed --sites is N
    "serve_arg": "ARG",
    "rate_limit": "PER_S",
    **dict.fromkeys(("poll_interval", "window"), "SECONDS"),
    **dict.fromkeys(("max_queue_delay_ms", "inline_below_ms"), "MS"),
    **dict.fromkeys(("max_accuracy_drop", "prune_amount"), "FRACTION"),
    "spike_factor": "FACTOR",
    "rate_burst": "TOKENS",
    "max_body_bytes": "BYTES",
    **dict.fromkeys(("days", "server_days"), "DAYS"),
    "overrides": "OVERRIDE",
    "state_dir": "STATE_DIR",
}
_DIR_SUFFIXES = ("dir", "store", "workdir", "pki")


def _metavar(action: argparse.Action) -> str:
    if action.type is int and action.dest == "sites":
        return "N"
    if action.dest in _METAVARS:
        return _METAVARS[action.dest]
    if action.type is Path:
        return "DIR" if action.dest.endswith(_DIR_SUFFIXES) else "FILE"
    if action.type is int:
        return "N"
    return "NUMBER" if action.type is float else "VALUE"


def _tidy(parser: argparse.ArgumentParser) -> None:
    """Give every value-taking option of ``parser`` and its sub-parsers a vocabulary metavar."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _tidy(sub)
        elif action.nargs != 0 and not action.choices and action.metavar is None:
            action.metavar = _metavar(action)
        elif action.dest == "overrides":
            action.metavar = "OVERRIDE"


def _version() -> str:
    """``fedinfer 0.1.0 (flwr 1.42.0, torch 2.13.0, opacus 1.6.0, Python 3.11.7)``."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import fedinfer

    parts = []
    for package in ("flwr", "torch", "opacus"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} not installed")
    parts.append(f"Python {platform.python_version()}")
    return f"fedinfer {fedinfer.__version__} ({', '.join(parts)})"


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedinfer",
        description="Federated learning and federated inference with DP and secure aggregation.",
        epilog="Each command has its own --help, e.g. fedinfer simulate --help.",
    )
    parser.add_argument(
        "-V",
        "--version",
        dest="show_version",
        action="store_true",
        help="print the versions of fedinfer, Flower, torch, Opacus and Python",
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
    _tidy(parser)
    return parser


def _unknown_command(word: str) -> int:
    import difflib

    close = difflib.get_close_matches(word, ["simulate", *_COMMAND_MODULES], n=1)
    hint = f"; did you mean `fedinfer {close[0]}`?" if close else ""
    print(f"fedinfer: error: unknown command {word!r}{hint}", file=sys.stderr)
    print("Try 'fedinfer --help'.", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedinfer`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(_version())
        return 0
    if args and args[0] == "simulate":
        from fedinfer.simulation.hydra_main import hydra_simulate

        return hydra_simulate(args[1:])
    if args and not args[0].startswith("-") and args[0] not in _COMMAND_MODULES:
        return _unknown_command(args[0])
    parser = _build_parser(args[0] if args else None)
    namespace = parser.parse_args(args)
    if namespace.show_version:
        print(_version())
        return 0
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
