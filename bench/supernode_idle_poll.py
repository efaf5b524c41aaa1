"""What an idle SuperNode's polling costs: CPU of the coordinator side and the sites per setting.

An idle SuperNode asks the SuperLink (through the Fleet gateway, TLS, signed with its node key)
for a message, and sleeps before asking again: Flower waits 3 s, ``fedinfer site`` less
(``--supernode-idle-poll-s``, :mod:`fedinfer.deploy.supernode`). A message then waits half that on
average before a site sees it. This starts a real SuperLink, the gateway and N idle SuperNodes
(no federation running) and measures, per setting, the CPU seconds per second that the
SuperLink, the gateway and the SuperNodes use together; with ``--workers`` also each site's
worker, which polls its own SuperNode's Runtime API (loopback) every ``POLL_INTERVAL_S``.

    python bench/supernode_idle_poll.py --sites 5 --window 20 --settings 3,1,0.5,0.25
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from fedinfer.deploy.flower import FlowerCli, flower_env, superlink_argv, supernode_argv
from fedinfer.deploy.supernode import write_runtime_secret
from fedinfer.deploy.local import LocalDeployment
from fedinfer.deploy.process import ManagedProcess, free_port, wait_until

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per setting")
    parser.add_argument("--settings", default="3,1,0.5,0.25")
    parser.add_argument("--workers", action="store_true", help="also start each site's worker")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedinfer-idle-poll-"))
    deployment = LocalDeployment(
        work / "d", num_sites=args.sites, rounds=1, overrides=["secagg=off"], encrypt_state=False
    )
    deployment.prepare()
    pki, link_port, fleet_port = deployment.pki, free_port(), free_port()
    env = flower_env(work / "flwr")
    link = ManagedProcess(
        "superlink",
        superlink_argv(
            ca_cert=pki.ca_cert,
            cert=pki.server_cert,
            key=pki.server_key,
            host="127.0.0.1",
            port=link_port,
            database=work / "superlink.db",
        ),
        log_file=work / "superlink.log",
        env=env,
    ).start()
    gateway = ManagedProcess(
        "gateway",
        [sys.executable, "-m", "fedinfer.deploy.gateway", "--host", "127.0.0.1", "--port",
         str(fleet_port), "--upstream", f"https://127.0.0.1:{link_port}", "--ca-cert",
         str(pki.ca_cert), "--certfile", str(pki.server_cert), "--keyfile", str(pki.server_key)],
        log_file=work / "gateway.log",
        env=env,
    ).start()  # fmt: skip
    cli = FlowerCli(work / "flwr", f"127.0.0.1:{link_port}", pki.ca_cert)
    cli.write_config()
    nodes: list[ManagedProcess] = []
    try:
        wait_until(lambda: _up(cli), timeout_s=120, what="the SuperLink", alive=link.check_alive)
        for name in deployment.names:
            cli.register_node(pki.node_pub(name), name=name)
        print(f"{args.sites} idle SuperNodes; CPU s per s of SuperLink + gateway + SuperNodes")
        print(
            "| idle poll (s) | mean wait before a site sees a message (s) | CPU s / s |"
            + (" of which site workers |" if args.workers else "")
        )
        print("|---|---|---|" + ("---|" if args.workers else ""))
        for setting in (float(s) for s in args.settings.split(",")):
            nodes = [
                _node(work, deployment, name, fleet_port, setting) for name in deployment.names
            ]
            workers = [_worker(work, n) for n in nodes] if args.workers else []
            wait_until(
                lambda: sum(n.get("status") == "online" for n in cli.list_nodes()) == args.sites,
                timeout_s=120,
                interval_s=1.0,
                what="every SuperNode online",
            )
            time.sleep(3.0)  # past start-up
            if workers:
                time.sleep(10.0)  # the workers' imports
            pids = [link.pid, gateway.pid, *(n.pid for n in nodes)]
            wpids = [w.pid for w in workers]
            before, started = sum(cpu_s(p) for p in pids), time.monotonic()
            wbefore = sum(cpu_s(p) for p in wpids)
            time.sleep(args.window)
            elapsed = time.monotonic() - started
            wused = (sum(cpu_s(p) for p in wpids) - wbefore) / elapsed
            used = (sum(cpu_s(p) for p in pids) - before) / elapsed + wused
            print(
                f"| {setting:g} | {setting / 2:.2f} | {used:.3f} |"
                + (f" {wused:.3f} |" if workers else "")
            )
            for proc in (*workers, *nodes):
                proc.stop()
            nodes = []
    finally:
        for proc in (*nodes, gateway, link):
            proc.stop()


def _up(cli: FlowerCli) -> bool:
    try:
        cli.list_nodes()
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return True


def _worker(work: Path, node: ManagedProcess) -> ManagedProcess:
    argv = node.argv
    state = Path(argv[argv.index("--node-config") + 1]).parent
    argv = [
        sys.executable,
        "-m",
        "fedinfer.deploy.site_worker",
        "--node-config",
        str(state / "node-config.toml"),
        "--runtime-api",
        f"127.0.0.1:{argv[argv.index('--port') + 1]}",
        "--secret-file",
        str(state / "runtime.secret"),
    ]
    return ManagedProcess(f"worker-{state.name}", argv, log_file=state / "worker.log").start()


def _node(
    work: Path, deployment: LocalDeployment, name: str, port: int, idle: float
) -> ManagedProcess:
    state = work / "sites" / name
    state.mkdir(parents=True, exist_ok=True)
    (state / "node-config.toml").write_text(f'"site-name" = "{name}"\n')
    argv = supernode_argv(
        superlink=f"127.0.0.1:{port}",
        ca_cert=deployment.pki.ca_cert,
        node_key=deployment.pki.node_key(name),
        node_config=state / "node-config.toml",
        runtime_port=free_port(),
        runtime_secret=write_runtime_secret(state / "runtime.secret"),
        idle_poll_s=None if idle == 3 else idle,
    )
    env = flower_env(state / "flwr")
    return ManagedProcess(name, argv, log_file=state / f"supernode-{idle:g}.log", env=env).start()


if __name__ == "__main__":
    main()
