"""Start-up time of ``fedinfer``: light commands and ``--help``, two trees side by side.

Each command runs as a fresh ``python -m fedinfer.cli`` process with ``PYTHONPATH`` set to one
tree; the trees alternate command by command, so machine load hits both alike. Reported: the
median wall time of ``--repeat`` runs per tree, the ratio, and whether the process imported
torch (``python -X importtime``).

    git archive main | tar -x -C /tmp/cli_base      # the baseline tree
    python bench/cli_startup.py --trees /tmp/cli_base . --repeat 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMANDS: list[list[str]] = [
    ["--help"],
    ["--version"],
    ["simulate", "--help"],
    ["serve", "--help"],
    ["predict", "--help"],
    ["privacy", "show", "--help"],
    ["report", "--help"],
    ["sweep", "--help"],
    ["site", "--help"],
    ["deploy", "local", "--help"],
    ["keys", "--help"],
    ["models", "list", "--model-store", "{store}"],
    ["site", "init-policy", "{state_dir}"],
    ["sweep"],
]


def make_store(root: Path) -> Path:
    """A model store holding two signed versions of a tiny model (made with the tree under test)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from artifact_factory import publish_versions
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return publish_versions(root, Ed25519PrivateKey.generate(), [1, 2]).root


def run_once(tree: Path, args: list[str], *, importtime: bool = False) -> tuple[float, bool]:
    """Wall seconds of one ``fedinfer ARGS`` process, and whether it imported torch."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "100"}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "fedinfer.cli"]
    start = time.perf_counter()
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, cwd=tree)
    elapsed = time.perf_counter() - start
    torch = any(line.split("|")[-1].strip() == "torch" for line in done.stderr.splitlines())
    return elapsed, torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", type=Path, default=[ROOT], metavar="DIR")
    parser.add_argument("--repeat", type=int, default=7, metavar="N")
    parser.add_argument("--match", default="", metavar="TEXT", help="only commands containing it")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp))
        header = " | ".join(f"{t.name or t} (s, median) | torch" for t in trees)
        print(f"| command | {header} |" + (" ratio |" if len(trees) == 2 else ""))
        print("|---" * (1 + 2 * len(trees) + (len(trees) == 2)) + "|")
        for template in [c for c in COMMANDS if args.match in " ".join(c)]:
            cells, medians = [], []
            for tree in trees:
                times = []
                for i in range(args.repeat):
                    state = Path(tmp) / f"state-{tree.name}-{i}"
                    argv = [a.format(store=store, state_dir=state) for a in template]
                    times.append(run_once(tree, argv)[0])
                state = Path(tmp) / f"state-{tree.name}-torch"
                argv = [a.format(store=store, state_dir=state) for a in template]
                torch = run_once(tree, argv, importtime=True)[1]
                medians.append(statistics.median(times))
                cells.append(f"{medians[-1]:.2f} | {'yes' if torch else 'no'}")
            ratio = f" {medians[0] / medians[1]:.1f}x |" if len(trees) == 2 else ""
            print(f"| `fedinfer {' '.join(template)}` | {' | '.join(cells)} |{ratio}", flush=True)


if __name__ == "__main__":
    main()
