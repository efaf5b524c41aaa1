"""The README's "Scoring a CSV file" block, run as written on a small finished run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from fedinfer.config import load_config
from fedinfer.simulation.run import run_simulation

README = Path(__file__).resolve().parents[1] / "README.md"
OVERRIDES = [
    "simulation.runtime=inprocess",
    "simulation.progress=false",
    "serving.enabled=false",
    "privacy=none",
    "secagg=off",
    "dataset.num_samples=600",
    "federation.num_sites=2",
    "federation.rounds=1",
    "model=logreg",
]


def _readme_block() -> str:
    pattern = r"<!-- predict-csv:start -->\n```bash\n(.*?)```\n<!-- predict-csv:end -->"
    block = re.search(pattern, README.read_text(), re.S)
    assert block is not None, "the README lost its predict-csv block"
    return block.group(1)


def test_readme_makes_a_csv_from_a_run_and_predict_scores_every_row(tmp_path: Path) -> None:
    # Prepare: a finished run with its .hydra/overrides.yaml, as `fedinfer simulate` leaves it
    run = tmp_path / "outputs" / "run"
    run_simulation(load_config(OVERRIDES), output_dir=run)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(OVERRIDES))
    script = re.sub(r"^RUN=\S+", f"RUN={run}", _readme_block(), count=1, flags=re.M)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # Execute
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, scored = pd.read_csv(tmp_path / "rows.csv"), pd.read_csv(tmp_path / "scored.csv")
    assert f"scored {len(rows)} of {len(rows)} rows" in proc.stdout
    assert scored["id"].tolist() == rows["id"].tolist() and len(rows) > 10
    assert scored["error"].isna().all() and scored["predicted_class"].between(0, 9).all()
