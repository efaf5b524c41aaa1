"""``fedinfer deploy local``: a whole deployment on this machine, over loopback, end to end.

The real thing, scaled down: a private CA and keys (``pki/``), one NPZ file per
site cut from the configured dataset (``data/``), ``fedinfer coordinator``
(SuperLink with TLS and node authentication behind the Fleet gateway) and one
``fedinfer site`` per site (SuperNode + inference server), each a separate
process with its own log in ``logs/``. It ends by asking every site's server
for a prediction and checking that it answers with the newly published version.

Every site gets a policy file (``sites/<site>/site_policy.toml``): the strict
default relaxed just enough to accept this run's config, with the coordinator's
signing key pinned and every site's identity key as its only trusted
secure-aggregation peers (``sites/<site>/secagg_peers.toml``); edit one and
restart the site to see it refuse.

Every site's state is encrypted at rest by default, with its own key in
``keys/<site>.state.key`` (outside the state directories, as in a real
deployment, where it would live on another volume or in a secrets store).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedinfer.artifacts import INPUT_NAME, ModelStore
from fedinfer.config import FedInferConfig, load_config
from fedinfer.config.validate import validate_config
from fedinfer.crypto.at_rest import StateKey
from fedinfer.data import site_name
from fedinfer.deploy.certs import Pki, init_pki
from fedinfer.deploy.process import (
    ManagedProcess,
    Shutdown,
    free_port,
    signals_raise_shutdown,
    wait_until,
)
from fedinfer.deploy.site import SiteLayout
from fedinfer.deploy.sitedata import sample_rows, write_site_files
from fedinfer.errors import ConfigError, FedInferError
from fedinfer.policy import POLICY_FILENAME
from fedinfer.reporting.results import RESULTS_FILE

__all__ = ["LocalDeployment", "check_options", "demo_line", "deploy_local", "infer"]


def infer(url: str, *, model_name: str, x: np.ndarray, timeout_s: float = 30.0) -> dict[str, Any]:
    """Send one KServe v2 inference request (JSON tensors); return the decoded response."""
    tensor = {
        "name": INPUT_NAME,
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.astype(np.float32).ravel().tolist(),
    }
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        response = client.post(f"{url}/v2/models/{model_name}/infer", json={"inputs": [tensor]})
    if response.status_code != 200:
        raise FedInferError(f"{url} answered {response.status_code}: {response.text[:300]}")
    result: dict[str, Any] = response.json()
    return result


class LocalDeployment:
    """The processes and paths of one ``deploy local`` run (the e2e test drives it too).

    Parameters
    ----------
    workdir : Path
        Fresh directory for everything.
    num_sites, rounds : int
        Federation size.
    overrides : sequence of str
        Hydra overrides (the default config: DP-SGD and secure aggregation on).
    port : int
        Fleet gateway port (0: a free one).
    encrypt_state : bool
        Encrypt each site's state at rest with its own key (default: True).
    data_layout : str
        How each site's data is written and handed to ``fedinfer site --data``: ``npz`` (one
        file, default), ``folder`` / ``png`` (class folders read lazily) or ``shards``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        num_sites: int,
        rounds: int,
        overrides: Sequence[str] = (),
        port: int = 0,
        encrypt_state: bool = True,
        data_layout: str = "npz",
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.encrypt_state = encrypt_state
        self.data_layout = data_layout
        self.names = [site_name(i) for i in range(num_sites)]
        self.overrides = [
            f"federation.num_sites={num_sites}",
            f"federation.rounds={rounds}",
            *overrides,
        ]
        self.port = port or free_port()
        self.pki = Pki(self.workdir / "pki")
        self.coordinator: ManagedProcess | None = None
        self.sites: dict[str, ManagedProcess] = {}

    @property
    def coordinator_dir(self) -> Path:  # noqa: D102
        return self.workdir / "coordinator"

    def site_dir(self, name: str) -> Path:  # noqa: D102
        return self.workdir / "sites" / name

    def data_path(self, name: str) -> Path:
        """``name``'s data: ``data/<name>.npz``, or the directory ``data/<name>/``."""
        data = self.workdir / "data"
        return data / f"{name}.npz" if self.data_layout == "npz" else data / name

    def state_key_file(self, name: str) -> Path:
        """Where ``name``'s state key lives: outside its state directory."""
        return self.workdir / "keys" / f"{name}.state.key"

    def state_key(self, name: str) -> StateKey | None:
        """``name``'s state key (None when the deployment keeps state in plaintext)."""
        return StateKey.load(self.state_key_file(name)) if self.encrypt_state else None

    def check(self) -> None:
        """Every check of the options and config that needs no file: nothing is written yet."""
        from fedinfer.privacy.noise import refuse_reproducible_noise

        if self.workdir.exists() and not self.workdir.is_dir():
            raise ConfigError(f"`--workdir` {self.workdir} is a file; choose a directory")
        cfg = load_config(self.overrides)
        validate_config(cfg)  # what the coordinator would refuse, before PKI, keys and data
        refuse_reproducible_noise(cfg.privacy.reproducible_noise, where="`fedinfer deploy local`")
        floor = cfg.site_policy.secagg_min_participants
        if cfg.secagg.enabled and cfg.federation.num_sites < floor:
            # Every site would refuse every round: a federation that publishes nothing.
            raise ConfigError(
                f"`--sites` {cfg.federation.num_sites} is below "
                f"`site_policy.secagg_min_participants`={floor}: each site refuses secure "
                "aggregation with fewer participants (with two, a site can subtract its own "
                f"update from the sum); use --sites {floor}, or add "
                f"site_policy.secagg_min_participants={cfg.federation.num_sites} or secagg=off"
            )

    def prepare(self) -> list[str]:
        """Keys and data; returns the coordinator's overrides including the model shape."""
        self.check()
        if self.coordinator_dir.exists():
            raise ConfigError(
                f"{self.workdir} holds an earlier deployment; delete it or choose another --workdir"
            )
        cfg = load_config(self.overrides)
        files = write_site_files(
            cfg, self.workdir / "data", names=self.names, layout=self.data_layout
        )
        shape_overrides = []
        if cfg.model.name == "custom":
            if cfg.model._target_:
                from fedinfer.models.custom import allow_target

                # One machine, one config: as in a simulation, the run's own model is allowed
                # (inherited by the coordinator and every site started from here).
                allow_target(cfg.model._target_)
            if cfg.model.input_shape is None:  # the coordinator holds no data to learn it from
                shape = ",".join(str(d) for d in files.sample_shape)
                shape_overrides.append(f"model.input_shape=[{shape}]")
        init_pki(self.pki.root, hosts=["127.0.0.1", "localhost"], sites=self.names)
        if self.encrypt_state:
            for name in self.names:
                StateKey.generate().save(self.state_key_file(name))
        self.write_policies(cfg)
        return [
            *self.overrides,
            f"deployment.input_dim={files.input_dim}",
            f"deployment.num_classes={files.num_classes}",
            *shape_overrides,
            "deployment.connect_timeout_s=300",
        ]

    def write_policies(self, cfg: FedInferConfig) -> None:
        """One policy per site: strict, relaxed to accept ``cfg``, the coordinator's key pinned.

        Its trusted secure-aggregation peers are exactly the deployment's sites: each
        site's identity key is made here, in its state directory (sealed with its state
        key), so that every site's peers file (``secagg_peers.toml``, next to its policy)
        lists all of them before the first round, as operators of real sites would by
        exchanging ``fedinfer site identity`` lines.
        """
        import dataclasses

        from fedinfer.artifacts import key_fingerprint, load_public_key
        from fedinfer.policy import PEERS_FILENAME, policy_accepting, save_peers, save_policy
        from fedinfer.secagg.store import RunStateStore

        pinned = key_fingerprint(load_public_key(self.pki.signing_pub))
        policy = policy_accepting(
            cfg, num_sites=len(self.names), coordinator_key_fingerprint=pinned
        )
        policy = dataclasses.replace(policy, secagg_trusted_peers=PEERS_FILENAME)
        peers = {
            name: RunStateStore(self.site_dir(name), key=self.state_key(name)).identity_public()
            for name in self.names
        }
        for name in self.names:
            save_peers(peers, self.site_dir(name) / PEERS_FILENAME)
            save_policy(policy, self.site_dir(name) / POLICY_FILENAME, overwrite=True)

    def start_coordinator(
        self, overrides: Sequence[str], *, resume: bool = False, keep_alive: bool = False
    ) -> ManagedProcess:
        """``fedinfer coordinator`` on loopback; waits until the sites' keys are registered.

        With ``keep_alive`` the SuperLink and gateway stay up after the federation ends
        (``coordinator.json``'s ``status`` says when it has), until :meth:`stop`.
        """
        argv = [
            sys.executable,
            "-m",
            "fedinfer",
            "coordinator",
            "--pki",
            str(self.pki.root),
            "--workdir",
            str(self.coordinator_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(["--resume"] if resume else []),
            *(["--keep-alive"] if keep_alive else []),
            *overrides,
        ]
        log_file = self.workdir / "logs" / "coordinator.log"
        self.coordinator = ManagedProcess("coordinator", argv, log_file=log_file).start()
        state_file, started = self.coordinator_dir / "coordinator.json", time.time()

        def launched() -> bool:
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            return bool(state.get("started", 0) >= started)

        wait_until(
            launched,
            timeout_s=300,
            what="the coordinator to register the sites",
            interval_s=0.5,
            alive=self.coordinator.check_alive,
        )
        return self.coordinator

    def start_site(
        self, name: str, *, extra: Sequence[str] = (), label: str | None = None
    ) -> ManagedProcess:
        """``fedinfer site`` for ``name`` with a free inference port; ``extra`` options override.

        ``label`` names the process (default: ``name``), e.g. for a second, misconfigured copy.
        """
        if label is None:  # a restart: no stale port for ask_site
            SiteLayout(self.site_dir(name)).state_file.unlink(missing_ok=True)
        label = label or name
        argv = [
            sys.executable,
            "-m",
            "fedinfer",
            "site",
            "--name",
            name,
            "--data",
            str(self.data_path(name)),
            "--state-dir",
            str(self.site_dir(name)),
            "--coordinator",
            f"127.0.0.1:{self.port}",
            "--ca",
            str(self.pki.ca_cert),
            "--key",
            str(self.pki.node_key(name)),
            "--serve-port",
            "0",
            "--policy",  # named, so that a copy with another --state-dir keeps the site's policy
            str(self.site_dir(name) / POLICY_FILENAME),
            *(["--state-key", str(self.state_key_file(name))] if self.encrypt_state else []),
            *extra,
        ]
        log_file = self.workdir / "logs" / f"{label}.log"
        self.sites[label] = ManagedProcess(label, argv, log_file=log_file).start()
        return self.sites[label]

    def results(self) -> dict[str, Any]:
        """Read the coordinator's ``results.json``."""
        data: dict[str, Any] = json.loads(
            (self.coordinator_dir / "output" / RESULTS_FILE).read_text()
        )
        return data

    def ask_site(
        self, name: str, *, expect_version: int, timeout_s: float = 120.0
    ) -> dict[str, Any]:
        """Wait until ``name``'s server serves ``expect_version``; return its answer for 4 rows."""
        layout = SiteLayout(self.site_dir(name))
        wait_until(
            lambda: layout.read_state().get("serve", {}).get("port") is not None,
            timeout_s=timeout_s,
            what=f"{name}'s inference server",
        )
        url = f"http://127.0.0.1:{layout.read_state()['serve']['port']}"
        model_name = (
            ModelStore(layout.models, key=self.state_key(name)).manifest(expect_version).name
        )
        x = sample_rows(self.data_path(name), 4)
        answer: dict[str, Any] = {}

        def serves_expected() -> bool:
            with contextlib.suppress(FedInferError, httpx.HTTPError):
                answer.update(infer(url, model_name=model_name, x=x))
            return str(answer.get("model_version")) == str(expect_version)

        wait_until(
            serves_expected,
            timeout_s=timeout_s,
            interval_s=0.5,
            what=f"{name} to serve version {expect_version}",
        )
        return {"site": name, "url": url, "labels": self.true_labels(name, len(x)), **answer}

    def true_labels(self, name: str, n: int) -> list[int] | list[float] | None:
        """The labels (or regression targets) of ``name``'s first ``n`` samples.

        None when its data is not one NPZ, or its labels are vectors (multi-label).
        """
        path = self.workdir / "data" / f"{name}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            if "y" not in data.files or data["y"].ndim != 1:
                return None
            y = data["y"][:n]
            if np.issubdtype(y.dtype, np.floating) and not np.all(y == np.round(y)):
                return [float(v) for v in y]
            return [int(v) for v in y]

    def stop(self) -> None:
        """SIGTERM every site, then the coordinator (each stops its own children)."""
        for proc in [*self.sites.values(), *([self.coordinator] if self.coordinator else [])]:
            proc.stop(timeout_s=30)


def deploy_local(
    *,
    workdir: Path,
    num_sites: int,
    rounds: int,
    overrides: Sequence[str],
    port: int = 0,
    keep_alive: bool = False,
    encrypt_state: bool = True,
    data_layout: str = "npz",
) -> int:
    """Run :class:`LocalDeployment` end to end and print what every site's server answered.

    Raises :class:`~fedinfer.errors.ConfigError` for a bad option or config before
    anything is written.
    """
    check_options(num_sites=num_sites, rounds=rounds, port=port, data_layout=data_layout)
    deployment = LocalDeployment(
        workdir,
        num_sites=num_sites,
        rounds=rounds,
        overrides=overrides,
        port=port,
        encrypt_state=encrypt_state,
        data_layout=data_layout,
    )
    with signals_raise_shutdown():
        try:
            coordinator_overrides = deployment.prepare()  # checks first, then writes
            print(
                f"deployment in {deployment.workdir}: logs in {deployment.workdir / 'logs'}",
                flush=True,
            )
            coordinator = deployment.start_coordinator(coordinator_overrides)
            for name in deployment.names:
                deployment.start_site(name)
            code = _follow_coordinator(coordinator)
            if code != 0:
                print(
                    f"the coordinator failed (exit {code}); see {coordinator.log_file}",
                    file=sys.stderr,
                )
                return 1
            version = deployment.results().get("model_version")
            if version is None:
                print(
                    "the federation published no model (no round was aggregated); see "
                    f"{deployment.workdir / 'logs'}",
                    file=sys.stderr,
                )
                return 1
            _ask_every_site(deployment, version=int(version))
            if keep_alive:
                print("sites keep serving; Ctrl-C stops them", flush=True)
                while True:
                    time.sleep(1.0)
            return 0
        except Shutdown:
            return 130
        finally:
            deployment.stop()


def check_options(*, num_sites: int, rounds: int, port: int, data_layout: str = "npz") -> None:
    """Refuse bad ``deploy local`` options, naming each (one ConfigError for all of them)."""
    from fedinfer.deploy.sitedata import LAYOUTS

    problems = []
    if data_layout not in LAYOUTS:
        problems.append(f"`--data-layout` {data_layout!r} is not one of {', '.join(LAYOUTS)}")
    if num_sites < 2:
        problems.append(
            f"`--sites` must be >= 2 (got {num_sites}): secure aggregation and FedAvg need two"
        )
    if rounds < 1:
        problems.append(f"`--rounds` must be >= 1 (got {rounds})")
    if not 0 <= port <= 65535:
        problems.append(f"`--port` must be 0 (a free port) or 1-65535 (got {port})")
    if problems:
        raise ConfigError("; ".join(problems))


def _ask_every_site(deployment: LocalDeployment, *, version: int) -> None:
    for name in deployment.names:
        answer = deployment.ask_site(name, expect_version=version)
        print(demo_line(answer), flush=True)


def demo_line(answer: dict[str, Any]) -> str:
    """One site's demo answer, its predictions next to the true labels of those rows.

    Examples
    --------
    >>> demo_line({"site": "site-00", "url": "http://127.0.0.1:1", "model_name": "mlp",
    ...            "model_version": "2", "labels": [1, 0],
    ...            "outputs": [{"shape": [2, 2], "data": [0.1, 0.9, 0.3, 0.7]}]})
    'site-00: http://127.0.0.1:1 model mlp v2 predicts [1, 1], true labels [1, 0] (1 of 2 right)'
    """
    outputs = {o.get("name"): o for o in answer["outputs"]}
    head = (
        f"{answer['site']}: {answer['url']} model {answer['model_name']} "
        f"v{answer['model_version']}"
    )
    labels = answer.get("labels")
    if "values" in outputs:  # regression: the values next to the true targets
        values = np.asarray(outputs["values"]["data"], dtype=float)
        shown = [round(float(v), 1) for v in values.reshape(outputs["values"]["shape"])[:, 0]]
        line = f"{head} predicts values {shown}"
        if labels is None:
            return line
        return f"{line}, true values {[round(float(v), 1) for v in labels]}"
    output = answer["outputs"][0]
    predicted = np.asarray(output["data"]).reshape(output["shape"]).argmax(axis=1).tolist()
    line = f"{head} predicts {predicted}"
    if labels is None:
        return line
    right = sum(p == t for p, t in zip(predicted, labels, strict=True))
    return f"{line}, true labels {labels} ({right} of {len(labels)} right)"


def _follow_coordinator(coordinator: ManagedProcess) -> int:
    """Echo the coordinator's log until it exits; return its exit code."""
    offset = 0
    while True:
        code = coordinator.poll()
        with open(coordinator.log_file, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
        if chunk:
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if code is not None:
            return code
        time.sleep(0.5)
