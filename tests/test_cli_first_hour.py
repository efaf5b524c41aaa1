"""The first hour of a new user (issue 14 items 1 and 8): every mistake one line, help that helps.

Every command runs as a real ``python -m fedinfer.cli`` process; nothing here starts a
federation (each mistake is refused before Hydra composes a job).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedinfer.cli import _build_parser
from fedinfer.config.overrides import check_overrides, config_groups
from fedinfer.config.store import conf_dir
from fedinfer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "flwr", "ray", "opacus")


def fedinfer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "fedinfer.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], command: str) -> str:
    """Exit 2, our line and the --help hint on stderr, no traceback; returns the error line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith(f"fedinfer {command}: error: ")
    assert lines[1] == f"Try 'fedinfer {command} --help'."
    return lines[0]


# ---------------------------------------------------------------- item 1: Hydra-level mistakes
MISTAKES = [
    ("model=nonexistent", "`model=nonexistent` is not a model option (choose one of cnn1d"),
    ("model=mlpp", "did you mean `model=mlp`?"),
    ("federaton.num_sites=3", "did you mean `federation.num_sites=3`?"),
    ("federation.num_site=3", "did you mean `federation.num_sites=3`?"),
    ("federation.rounds=abc", "`federation.rounds=abc`: Value 'abc'"),
    ("+federaton.num_sites=3", "adds a key that the config schema does not have"),
    ("+federation.rounds=3", "drop the `+`"),
    ("+model=mlp", "drop the `+`"),
    ("model.kwargs.dropout=0.1", "`+model.kwargs.dropout=0.1`"),
    ("foo", "cannot parse the override 'foo'"),
    ("hydra/launcher=nope", "Could not find 'hydra/launcher/nope' (choose one of basic"),
]


@pytest.mark.parametrize(("override", "expected"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistaken_override_is_one_line_and_exit_2(
    tmp_path: Path, override: str, expected: str
) -> None:
    # Execute
    done = fedinfer("simulate", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    # Assert
    assert expected in assert_one_line_error(done, "simulate")
    assert not (tmp_path / "run").exists()  # refused before any job started


SWEEP_MISTAKES = [
    ("federation.rounds=1,abc", "`federation.rounds=abc`"),
    ("model=mlp,nonexistent", "`model=nonexistent` is not a model option"),
    ("+federaton.num_sites=3,4", "did you mean `federation.num_sites=3,4`?"),
    ("federaton.num_sites=3,4", "did you mean `federation.num_sites=3,4`?"),
]


@pytest.mark.parametrize(
    ("override", "expected"), SWEEP_MISTAKES, ids=[m[0] for m in SWEEP_MISTAKES]
)
def test_a_mistake_in_a_sweep_stops_it_before_the_first_job(
    tmp_path: Path, override: str, expected: str
) -> None:
    # Execute: the first value is valid, so Hydra alone would have run job 0
    done = fedinfer(
        "simulate", "-m", override, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path
    )
    # Assert
    assert expected in assert_one_line_error(done, "simulate")
    assert not (tmp_path / "sweep").exists()


def test_a_ready_made_sweep_with_a_typo_is_refused(tmp_path: Path) -> None:
    """`fedinfer sweep` composes onto simulations/ with --config-dir; the same checks apply."""
    # Execute
    done = fedinfer("sweep", "noniid", "federaton.num_sites=3", cwd=tmp_path)
    # Assert
    assert "did you mean `federation.num_sites=3`?" in assert_one_line_error(done, "simulate")
    assert not (tmp_path / "multirun").exists()


def test_an_unknown_flag_is_one_line(tmp_path: Path) -> None:
    done = fedinfer("simulate", "--bogus", cwd=tmp_path)
    assert "unknown option '--bogus'" in assert_one_line_error(done, "simulate")


def test_valid_overrides_pass_the_check() -> None:
    """The negative twin: everything Hydra accepts on our config passes unchanged."""
    check_overrides(
        [
            "model=mlp",
            "privacy=none,dpsgd",
            "secagg=off",
            "federation.num_sites=3",
            "seed=range(1,4)",
            "model.hidden_sizes=[64,32]",
            "+model.kwargs.dropout=0.1",
            "dataset.num_samples=${seed}",
            "privacy.noise_multiplier=interval(0.5,2.0)",
            "privacy.target_epsilon=null",
            "~faults",
            "hydra/launcher=joblib",
            "hydra.run.dir=out",
            "++hydra.job.chdir=false",
        ],
        conf=conf_dir(),
    )


def test_every_value_of_a_sweep_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"`federation\.lr=fast`.*`federation\.lr=slow`"):
        check_overrides(["federation.lr=0.1,fast,slow"], conf=conf_dir())


def test_a_valid_override_still_reaches_hydra(tmp_path: Path) -> None:
    """--cfg job composes and prints the config (no federation): the override took effect."""
    done = fedinfer("simulate", "--cfg", "job", "federation.num_sites=3", "model=mlp", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "num_sites: 3" in done.stdout and "name: mlp" in done.stdout


def test_a_value_outside_the_choices_suggests_the_closest() -> None:
    """The typed config's own validation (strategy.name) says "did you mean" too."""
    from fedinfer.config.schema import FedInferConfig
    from fedinfer.config.validate import validate_config

    cfg = FedInferConfig()
    cfg.strategy.name = "fedavgg"
    with pytest.raises(ConfigError, match="did you mean strategy.name=fedavg"):
        validate_config(cfg)


# ---------------------------------------------------------------- item 8: help and start-up
def test_version(tmp_path: Path) -> None:
    done = fedinfer("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("fedinfer 0.1.0 (flwr 1.42.0, torch 2.13.0")


def test_simulate_help_is_ours_and_lists_groups_and_keys(tmp_path: Path) -> None:
    # Execute
    done = fedinfer("simulate", "--help", cwd=tmp_path)
    # Assert
    assert done.returncode == 0
    assert "powered by Hydra" not in done.stdout and "hydra_main" not in done.stdout
    assert done.stdout.startswith("usage: fedinfer simulate")
    for group, options in config_groups(conf_dir()).items():
        line = next(x for x in done.stdout.splitlines() if x.startswith(f"  {group} "))
        assert all(o in line for o in options[:3]), line
    assert "mnist1d*" in done.stdout  # the default is marked
    assert "num_sites" in done.stdout and "noise_multiplier" in done.stdout


def _actions(parser: argparse.ArgumentParser, path: str = "fedinfer"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_has_help_and_a_metavar_from_one_vocabulary() -> None:
    vocabulary = {
        "DIR", "FILE", "N", "HOST", "PORT", "HOST:PORT", "COLUMN", "NAME", "VERSION", "NAMES",
        "ARG", "PER_S", "SECONDS", "MS", "FRACTION", "FACTOR", "BYTES", "DAYS", "OVERRIDE",
        "STATE_DIR", "SWEEP_DIR", "ACC", "TOKENS", "V[,V...]", "NUMBER", "VALUE",
    }  # fmt: skip
    missing, odd = [], []
    for path, action in _actions(_build_parser()):
        name = f"{path} {'/'.join(action.option_strings) or action.dest}"
        if not action.help:
            missing.append(name)
        if action.nargs != 0 and not action.choices and action.metavar not in vocabulary:
            odd.append(f"{name}: {action.metavar}")
    assert missing == [] and odd == []


def test_one_spelling_of_summarize(tmp_path: Path) -> None:
    texts = [fedinfer(*a, "--help", cwd=tmp_path).stdout for a in ([], ["report"])]
    assert all("summarise" not in t for t in texts) and "summarize" in texts[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from artifact_factory import publish_versions
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    root = tmp_path_factory.mktemp("store")
    return publish_versions(root, Ed25519PrivateKey.generate(), [1, 2]).root


LIGHT = [
    ["--help"],
    ["--version"],
    ["simulate", "--help"],
    ["simulate", "federaton.num_sites=3"],
    ["serve", "--help"],
    ["predict", "--help"],
    ["privacy", "show", "--help"],
    ["report", "--help"],
    ["sweep", "--help"],
    ["sweep"],
    ["site", "--help"],
    ["deploy", "local", "--help"],
    ["keys", "--help"],
    ["certs", "--help"],
    ["models", "list", "--model-store", "{store}"],
    ["site", "init-policy", "{state}"],
]


@pytest.mark.parametrize("argv", LIGHT, ids=[" ".join(a) for a in LIGHT])
def test_light_commands_import_no_torch_flower_or_ray(
    tmp_path: Path, store: Path, argv: list[str]
) -> None:
    """Start-up in a fraction of a second: the heavy runtimes are never imported (timings are in
    bench/cli_startup.py, not here)."""
    # Prepare
    args = [a.format(store=store, state=tmp_path / "state") for a in argv]
    probe = (
        "import sys\nfrom fedinfer.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(0 if code in (0, 2, None) else 1)\n"
    )
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    # Execute
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    # Assert
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stderr, done.stderr


def test_models_list_is_a_table_not_cut_when_piped(tmp_path: Path, store: Path) -> None:
    # Execute: stdout is a pipe, as in `fedinfer models list ... | less`
    done = fedinfer("models", "list", "--model-store", str(store), cwd=tmp_path)
    # Assert
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(x for x in lines if "version" in x)
    assert all(h in header for h in ("current", "round", "created (UTC)", "metrics", "privacy"))
    rows = [x for x in lines if " v1 " in x or " v2 " in x]
    assert len(rows) == 2 and max(len(x) for x in lines) > 80  # wider than rich's pipe default
    assert "accuracy=0.52" in rows[1] and "epsilon=3" in rows[1] and "*" in rows[1]


def test_a_piped_console_is_as_wide_as_its_table(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.table import Table

    from fedinfer.console import make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table()
    for i in range(8):
        table.add_column(f"a long column header {i}")
    table.add_row(*[f"value {i}" for i in range(8)])
    buffer = io.StringIO()
    make_console(file=buffer).print(table)
    assert "a long column header 7" in buffer.getvalue()
    assert len({len(line) for line in buffer.getvalue().splitlines()}) == 1  # no wrapped cell


def test_deploy_overrides_get_the_same_checks(tmp_path: Path) -> None:
    """`deploy local` and `coordinator` compose with load_config: same one line, nothing made."""
    done = fedinfer("deploy", "local", "--workdir", str(tmp_path / "d"), "federaton.num_sites=3",
                    cwd=tmp_path)  # fmt: skip
    assert "did you mean `federation.num_sites=3`?" in assert_one_line_error(done, "deploy")
    assert not (tmp_path / "d").exists()


def test_a_mistyped_command_suggests_the_closest(tmp_path: Path) -> None:
    done = fedinfer("simulat", "federation.rounds=1", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2
    assert lines[0] == (
        "fedinfer: error: unknown command 'simulat'; did you mean `fedinfer simulate`?"
    )
