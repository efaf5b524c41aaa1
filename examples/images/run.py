"""Federate a BatchNorm CNN on 8x8 digit images with DP-SGD + secure aggregation, serve, query.

One command, from the repository root::

    python examples/images/run.py            # about a minute or two on a laptop

Steps: (1) a simulation of 4 sites trains ``examples.images.net.DigitsCnn`` on scikit-learn's
bundled digits as ``(1, 8, 8)`` images (nothing downloaded; BatchNorm replaced by GroupNorm
because of ``privacy.fix_model=true``); (2) site-00 serves its signed model with
``fedinfer serve --backend onnx`` in its own process, from the ONNX graph signed into the
artifact, with no model code on its allow-list; (3) tritonclient sends ``[n, 1, 8, 8]``
images; (4) ``fedinfer predict --backend onnx`` scores an NPZ of images offline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TARGET = "examples.images.net.DigitsCnn"


def overrides(
    *,
    sites: int,
    rounds: int,
    runtime: str,
    epsilon: float,
    dp: bool = True,
    image_dir: Path | None = None,
) -> list[str]:
    """The Hydra overrides of the example's federation (``dp=False``: the no-DP baseline).

    With ``image_dir`` the sites read PNG class folders lazily (``dataset=folder``) instead of
    the in-memory digits.
    """
    privacy = (
        ["privacy=dpsgd", "privacy.fix_model=true", f"privacy.target_epsilon={epsilon}"]
        if dp
        # BatchNorm stays without DP-SGD; its int64 counter cannot go through secure aggregation.
        else ["privacy=none", "secagg=off"]
    )
    data = ["dataset=folder", f"dataset.path={image_dir}"] if image_dir else ["dataset=digits"]
    return [
        *data,  # the data layer says (1, 8, 8): model.input_shape defaults to it
        "model=custom",
        f"model._target_={TARGET}",
        "+model.kwargs.channels=16",
        *privacy,  # dpsgd + fix_model: BatchNorm -> GroupNorm, reported in results.json
        *(["secagg=on"] if dp else []),
        f"federation.num_sites={sites}",
        f"federation.rounds={rounds}",
        "federation.batch_size=64",
        "partition=iid",
        "serving.enabled=false",
        f"simulation.runtime={runtime}",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # The serving site allows no model code at all: the artifact carries the signed ONNX
    # graph, which ONNX Runtime runs as data (--backend torch would need the allow-list).
    env.pop("FEDINFER_MODEL_TARGETS", None)
    return env


def _serve(store: Path, public_key: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    log = workdir / "serve.log"
    with log.open("wb") as sink:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedinfer.cli", "serve", "--model-store", str(store),
             "--public-key", str(public_key), "--backend", "onnx", "--port", "0",
             "--port-file", str(port_file)],
            env=_env(), stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError(f"fedinfer serve exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("fedinfer serve did not start")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{int(port_file.read_text().strip())}"


def _query(url: str, images: np.ndarray) -> tuple[list[int], np.ndarray]:
    import tritonclient.http as httpclient

    import httpx

    deadline = time.monotonic() + 120
    while True:  # the port is bound before the server listens and loads the model
        try:
            if httpx.get(f"http://{url}/v2/models/custom/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the model did not become ready")
        time.sleep(0.2)
    client = httpclient.InferenceServerClient(url=url)
    shape = client.get_model_metadata("custom")["inputs"][0]["shape"]
    inp = httpclient.InferInput("input", list(images.shape), "FP32")
    inp.set_data_from_numpy(images, binary_data=True)
    out = httpclient.InferRequestedOutput("predicted_class", binary_data=True)
    result = client.infer("custom", inputs=[inp], outputs=[out])
    client.close()
    return shape, result.as_numpy("predicted_class")


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the example; return (and print) its summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/examples-images"))
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--runtime", choices=("ray", "inprocess"), default="ray")
    parser.add_argument("--no-dp", action="store_true", help="the baseline without DP-SGD")
    parser.add_argument(
        "--png",
        action="store_true",
        help="write the digits as PNG class folders (OUT/images/<class>/) and read them lazily",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]  # Ray workers import the model too

    from fedinfer.config import load_config
    from fedinfer.simulation import run_simulation

    out = args.out.resolve()
    image_dir = None
    if args.png:
        from fedinfer.config.schema import DatasetConfig
        from fedinfer.data import load_dataset
        from fedinfer.data.writers import write_folder

        image_dir = out / "images"
        if not image_dir.exists():
            digits = load_dataset(DatasetConfig(name="digits"), seed=0)
            write_folder(digits, image_dir, sample_shape=(1, 8, 8), suffix=".png")
    cfg = load_config(
        overrides(
            sites=args.sites,
            rounds=args.rounds,
            runtime=args.runtime,
            epsilon=args.epsilon,
            dp=not args.no_dp,
            image_dir=image_dir,
        )
    )
    result = run_simulation(cfg, output_dir=out)
    results = json.loads((out / "results.json").read_text())

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.data[-200:] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target[-200:]
    store, public_key = out / "sites" / "site-00" / "models", out / "coordinator" / "signing.pub"
    proc, url = _serve(store, public_key, out)
    try:
        shape, predicted = _query(url, images)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    np.savez(out / "images.npz", x=images)
    subprocess.run(
        [sys.executable, "-m", "fedinfer.cli", "predict", "--model-store", str(store),
         "--input", str(out / "images.npz"), "--output", str(out / "predictions.csv"),
         "--public-key", str(public_key), "--backend", "onnx", "--no-progress"],
        env=_env(), check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import pandas as pd

    offline = pd.read_csv(out / "predictions.csv")
    summary: dict[str, object] = {
        "final_accuracy": result.final_accuracy,
        "max_epsilon": results.get("max_epsilon"),
        "dp_fixes": results["model"]["dp_fixes"],
        "num_parameters": results["model"]["num_parameters"],
        "served_input_shape": shape,
        "served_accuracy": float((predicted.reshape(-1) == labels).mean()),
        "predict_rows": len(offline),
        "predict_agrees_with_server": bool(
            (offline["predicted_class"].to_numpy() == predicted.reshape(-1)).all()
        ),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
