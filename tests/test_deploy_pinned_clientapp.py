"""A site runs only its own fedinfer ClientApp, whatever app bundle the coordinator ships.

The attack: a coordinator (it holds the SuperLink's Control API) runs ``flwr run`` on a crafted
app bundle whose ``clients/app.py`` writes a file at the site and replies with the path of the
site's data (read from its node config). Flower's SuperNode would install that bundle and import
its ClientApp in a fresh ``flwr-clientapp`` process at every site: code of the coordinator's
choosing, past the site's policy, its privacy ledger and secure aggregation.

Also: the SuperNode's Runtime API (loopback) hands out the site's tasks to whoever asks; a local
user must not be able to claim one without the site's secret.

Everything is real: a SuperLink with TLS and node authentication, ``fedinfer site`` as the CLI
starts it, ``flwr run`` of a bundle built from disk, Flower's own ServerApp process.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tomli_w

from fedinfer.deploy.flower import FlowerCli, flower_env, superlink_argv
from fedinfer.deploy.local import LocalDeployment
from fedinfer.deploy.process import ManagedProcess, free_port, wait_until
from fedinfer.deploy.site import SiteLayout

pytestmark = pytest.mark.timeout(600)

EVIL_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    content = RecordDict({"c": ConfigRecord({"x": 1})})
    replies = grid.send_and_receive(
        [Message(content, node, "query.pwn") for node in nodes], timeout=240
    )
    answers = []
    for reply in replies:
        if reply.has_error():
            answers.append({"error": reply.error.reason})
        else:
            answers.append({"content": dict(reply.content.config_records["node"])})
    Path(str(context.run_config["out"])).write_text(json.dumps(answers))
'''
EVIL_CLIENT = '''
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("pwn")
def pwn(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker"])).write_text("the coordinator's code ran here")
    node = ConfigRecord({k: str(v) for k, v in context.node_config.items()})
    return Message(RecordDict({"node": node}), reply_to=msg)
'''


@dataclass
class Site:
    """A running SuperLink, one ``fedinfer site`` connected to it, and the CLI to run apps."""

    deployment: LocalDeployment
    cli: FlowerCli
    name: str


def _write_evil_app(directory: Path, *, publisher: str, out: Path, marker: Path) -> Path:
    (directory / "server").mkdir(parents=True)
    (directory / "clients").mkdir()
    pyproject = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedinfer", "version": "1.0.0", "license": "Apache-2.0"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {"serverapp": "server.app:app", "clientapp": "clients.app:app"},
                    "config": {"out": str(out), "marker": str(marker)},
                }
            }
        },
    }
    (directory / "pyproject.toml").write_bytes(tomli_w.dumps(pyproject).encode())
    (directory / "server" / "app.py").write_text(textwrap.dedent(EVIL_SERVER))
    (directory / "clients" / "app.py").write_text(textwrap.dedent(EVIL_CLIENT))
    return directory


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("pinned") / "deploy"
    deployment = LocalDeployment(
        workdir,
        num_sites=2,
        rounds=1,
        overrides=["secagg=off", "model=logreg", "dataset.num_samples=400"],
        encrypt_state=False,
    )
    deployment.prepare()
    name = deployment.names[0]
    link_dir = workdir / "link"
    (link_dir / "logs").mkdir(parents=True)
    pki = deployment.pki
    deployment.port = free_port()  # the site connects straight to the SuperLink's Fleet API
    link = ManagedProcess(
        "superlink",
        superlink_argv(
            ca_cert=pki.ca_cert,
            cert=pki.server_cert,
            key=pki.server_key,
            host="127.0.0.1",
            port=deployment.port,
            database=link_dir / "superlink.db",
        ),
        log_file=link_dir / "logs" / "superlink.log",
        env=flower_env(link_dir / "flwr"),
    ).start()
    try:
        cli = FlowerCli(link_dir / "flwr", f"127.0.0.1:{deployment.port}", pki.ca_cert)
        cli.write_config()
        wait_until(_answers(cli), timeout_s=120, what="the SuperLink", alive=link.check_alive)
        cli.register_node(pki.node_pub(name), name=name)
        deployment.start_site(name, extra=["--no-serve"])
        wait_until(
            lambda: any(n.get("status") == "online" for n in cli.list_nodes()),
            timeout_s=180,
            interval_s=1.0,
            what="the site to connect",
            alive=deployment.sites[name].check_alive,
        )
        yield Site(deployment, cli, name)
    finally:
        deployment.stop()
        link.stop()


def _answers(cli: FlowerCli) -> object:
    def ok() -> bool:
        try:
            cli.list_nodes()
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return True

    return ok


def _run_evil_app(site: Site, tmp_path: Path, *, publisher: str) -> tuple[list[dict], Path]:
    out, marker = tmp_path / "replies.json", tmp_path / "pwned"
    app = _write_evil_app(tmp_path / "app", publisher=publisher, out=out, marker=marker)
    site.cli.run(app)
    wait_until(out.exists, timeout_s=300, interval_s=0.5, what="the crafted ServerApp's replies")
    return json.loads(out.read_text()), marker


# A bundle that says it is fedinfer's (the realistic attack: the coordinator edits clients/app.py)
# and one that does not even pretend.
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
@pytest.mark.parametrize("publisher", ["fedinfer", "mallory"], ids=["fedinfer-named", "foreign"])
def test_a_crafted_bundle_never_runs_its_code_at_the_site(
    site: Site, tmp_path: Path, publisher: str
) -> None:
    # Execute
    replies, marker = _run_evil_app(site, tmp_path, publisher=publisher)
    # Assert
    data = str(site.deployment.data_path(site.name))
    assert not marker.exists(), "the coordinator's clients/app.py ran at the site"
    assert len(replies) == 1
    assert data not in json.dumps(replies), "the site's data path left the site"
    assert "error" in replies[0]
    if publisher != "fedinfer":
        assert "runs only its own fedinfer ClientApp" in replies[0]["error"]
        log = (SiteLayout(site.deployment.site_dir(site.name)).logs / "worker.log").read_text()
        assert "runs only its own fedinfer ClientApp" in log


def _runtime_api(site: Site) -> str:
    """The SuperNode's Runtime API address, from its command line (what a local user sees)."""
    layout = SiteLayout(site.deployment.site_dir(site.name))
    pid = layout.read_state()["pids"]["supernode"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    port = argv[argv.index(b"--port") + 1].decode()
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize("secret", [None, b"guessed"], ids=["no-secret", "wrong-secret"])
def test_a_local_process_cannot_claim_the_sites_tasks(site: Site, secret: bytes | None) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    # Prepare
    interceptors = (
        []
        if secret is None
        else [
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
            )
        ]
    )
    with RuntimeHttpClient.from_server_address(
        server_address=_runtime_api(site),
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
    ) as client:
        # Execute / Assert
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    assert refused.value.response.status_code in (401, 403)


def test_the_sites_own_secret_claims_tasks(site: Site) -> None:
    """The negative twin: with the site's secret the same call is accepted (no task pending)."""
    from fedinfer.deploy.flower_runtime import acquire_task, runtime_client

    layout = SiteLayout(site.deployment.site_dir(site.name))
    secret_file = layout.runtime_secret
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert os.stat(layout.root).st_mode & 0o777 == 0o700
    with runtime_client(_runtime_api(site), secret=secret_file.read_bytes()) as client:
        assert acquire_task(client) is None


def test_a_sigkilled_site_worker_is_restarted_and_answers_the_next_message(
    site: Site, tmp_path: Path
) -> None:
    """Fault: the site worker (it runs the site's ClientApp) is killed with SIGKILL. The site
    starts a new one at once, records its pid, and the next message is answered by it (here the
    refusal of a foreign bundle, which only the worker sends)."""
    layout = SiteLayout(site.deployment.site_dir(site.name))
    killed = layout.read_state()["pids"]["worker"]
    # Execute
    os.kill(killed, signal.SIGKILL)

    def restarted() -> bool:
        return layout.read_state().get("pids", {}).get("worker") not in (None, killed)

    wait_until(restarted, timeout_s=60, interval_s=0.2, what="a new site worker")
    replies, marker = _run_evil_app(site, tmp_path, publisher="mallory")
    # Assert
    worker = layout.read_state()["pids"]["worker"]
    assert Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")[2] == (
        b"fedinfer.deploy.site_worker"
    )
    assert len(replies) == 1 and "runs only its own fedinfer ClientApp" in replies[0]["error"]
    assert not marker.exists()
    site_log = site.deployment.sites[site.name].log_file.read_text()
    assert "worker exited with code -9" in site_log and "restarting the site worker" in site_log
    assert site.deployment.sites[site.name].poll() is None  # the site itself stayed up
