"""CLI sub-commands of a deployment: certs, coordinator, site, deploy, status.

Plugged into ``fedinfer`` by :mod:`fedinfer.cli` through :func:`register`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from fedinfer.errors import ConfigError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``certs``, ``coordinator``, ``site``, ``deploy`` and ``status`` to ``fedinfer``."""
    _add_certs(subparsers)
    _add_coordinator(subparsers)
    _add_site(subparsers)
    _add_deploy(subparsers)
    _add_status(subparsers)


# ---------------------------------------------------------------------------- certs
def _add_certs(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "certs", help="CA, SuperLink certificate, site node keys, model-signing key"
    )
    sub = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init", help="create a PKI directory (CA, TLS cert, signing key, site keys)"
    )
    init.add_argument("out_dir", type=Path, metavar="DIR", help="the PKI directory to create")
    init.add_argument(
        "--coordinator-host",
        action="append",
        required=True,
        help="name or IP sites use to reach the coordinator (repeatable or comma-separated)",
    )
    init.add_argument("--sites", default="", help="comma-separated site names, e.g. a,b,c")
    init.add_argument(
        "--server-days", type=int, default=397, help="SuperLink certificate validity (days)"
    )
    init.set_defaults(func=_certs_init)
    add = sub.add_parser("add-site", help="add a site: a new node key pair, or only its public key")
    add.add_argument("name", metavar="NAME", help="the new site's name")
    add.add_argument("--pki", type=Path, required=True, help="the `certs init` directory")
    add.add_argument(
        "--public-key",
        type=Path,
        help="the site's own OpenSSH EC public key (it keeps the private one)",
    )
    add.set_defaults(func=_certs_add_site)
    renew = sub.add_parser(
        "renew-server", help="issue a new SuperLink certificate (restart the coordinator after)"
    )
    renew.add_argument("--pki", type=Path, required=True, help="the `certs init` directory")
    renew.add_argument(
        "--coordinator-host", action="append", help="replace the host names (repeatable)"
    )
    renew.add_argument(
        "--days", type=int, default=397, help="certificate validity (default: 397 days)"
    )
    renew.set_defaults(func=_certs_renew)
    show = sub.add_parser("show", help="sites, names and expiry dates")
    show.add_argument("--pki", type=Path, required=True, help="the `certs init` directory")
    show.set_defaults(func=_certs_show)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _certs_init(ns: argparse.Namespace) -> int:
    from fedinfer.deploy.certs import init_pki

    pki = init_pki(
        ns.out_dir,
        hosts=_split(ns.coordinator_host),
        sites=_split([ns.sites]),
        server_days=ns.server_days,
    )
    print(f"PKI in {pki.root}: CA, SuperLink certificate, signing key, sites {pki.sites()}")
    print(f"hand each site its bundle {pki.root / 'sites' / '<name>'}; keep {pki.ca_key} offline")
    return 0


def _certs_add_site(ns: argparse.Namespace) -> int:
    from fedinfer.deploy.certs import add_site

    bundle = add_site(ns.pki, ns.name, public_key=ns.public_key)
    print(
        f"site {ns.name}: bundle in {bundle}; a running coordinator registers it on its next start "
        "(or now: `flwr supernode register <node.pub>`)"
    )
    return 0


def _certs_renew(ns: argparse.Namespace) -> int:
    from fedinfer.deploy.certs import renew_server_cert

    cert = renew_server_cert(ns.pki, hosts=_split(ns.coordinator_host) or None, days=ns.days)
    print(f"new SuperLink certificate {cert}; restart the coordinator to use it")
    return 0


def _certs_show(ns: argparse.Namespace) -> int:
    from fedinfer.deploy.certs import describe

    print(json.dumps(describe(ns.pki), indent=2))
    return 0


# ---------------------------------------------------------------------- coordinator
def _add_coordinator(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="start the SuperLink (TLS, node auth) and run a federation on it",
        description="Hydra overrides follow the options, e.g. federation.rounds=5 "
        "deployment.input_dim=40.",
    )
    p.add_argument("--pki", type=Path, required=True, help="the `fedinfer certs init` directory")
    p.add_argument(
        "--workdir", type=Path, required=True, help="the coordinator's state, logs and results"
    )
    p.add_argument(
        "--host", default="0.0.0.0", help="address of the Fleet gateway sites connect to"
    )
    p.add_argument(
        "--port", type=int, default=9092, help="port of the Fleet gateway (default: 9092)"
    )
    p.add_argument(
        "--link-port", type=int, default=0, help="loopback port of the SuperLink (0: free)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the last completed round")
    p.add_argument("--keep-alive", action="store_true", help="stay up after the federation ends")
    p.add_argument(
        "--config-dir", type=Path, help="Hydra config directory (default: the repository's conf/)"
    )
    p.add_argument("--config-name", default="config", help="Hydra config name (default: config)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides")
    p.set_defaults(func=_coordinator)


def _load_config(ns: argparse.Namespace) -> Any:
    from fedinfer.config import load_config

    if ns.config_dir is not None:
        os.environ["FEDINFER_CONF_DIR"] = str(Path(ns.config_dir).resolve())
    return load_config(ns.overrides, config_name=ns.config_name)


def _coordinator(ns: argparse.Namespace) -> int:
    from fedinfer.deploy.coordinator import CoordinatorOptions, run_coordinator_service

    return run_coordinator_service(
        CoordinatorOptions(
            cfg=_load_config(ns),
            pki_dir=ns.pki,
            workdir=ns.workdir,
            host=ns.host,
            port=ns.port,
            link_port=ns.link_port,
            resume=ns.resume,
            keep_alive=ns.keep_alive,
        )
    )


# ----------------------------------------------------------------------------- site
def _add_site(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "site",
        help="start a site: its SuperNode and its inference server (or: site init-policy DIR)",
        description="Start a site, or write its policy: `fedinfer site init-policy STATE_DIR`.",
    )
    sub = p.add_subparsers(dest="site_command", metavar="[init-policy|identity]")
    init = sub.add_parser(
        "init-policy",
        help="write the strict default site policy (site_policy.toml) into a state directory",
    )
    init.add_argument(
        "state_dir", type=Path, metavar="STATE_DIR", help="the site's state directory"
    )
    init.add_argument(
        "--coordinator-public-key",
        type=Path,
        metavar="FILE",
        help="pin this model-signing public key (its fingerprint) in the policy",
    )
    init.set_defaults(func=_site_init_policy)
    ident = sub.add_parser(
        "identity",
        help="print the site's secure-aggregation identity key as a line of its peers' "
        "`secagg_trusted_peers` file (created once)",
        description="Hand the printed line to every peer site's operator and compare the "
        "fingerprint over another channel; each adds it to its peers file.",
    )
    ident.add_argument(
        "state_dir", type=Path, metavar="STATE_DIR", help="the site's state directory"
    )
    ident.add_argument(
        "--name", help="the site's name in the peers file (default: the state directory's name)"
    )
    ident.add_argument(
        "--state-key",
        type=Path,
        metavar="FILE",
        help="the key the site's state is encrypted with "
        "(default: $FEDINFER_STATE_KEY_FILE, else plaintext)",
    )
    ident.set_defaults(func=_site_identity)
    # Required for starting a site, checked in _site: argparse would demand them of init-policy.
    p.add_argument("--name", help="the site's name (its node key was made for it)")
    p.add_argument(
        "--data",
        help="the site's data: a CSV / Parquet / NPZ file; a directory read lazily (class "
        "folders of PNG/NPY samples, or NPZ/Parquet shards); or py:my_pkg.data.load_site, a "
        "data function named in $FEDINFER_DATA_TARGETS",
    )
    p.add_argument("--state-dir", type=Path, help="models, ledger, audit log, policy, logs")
    p.add_argument("--coordinator", help="HOST:PORT of the coordinator's Fleet gateway")
    p.add_argument("--ca", type=Path, help="the deployment's CA certificate")
    p.add_argument("--key", type=Path, help="this site's node private key")
    p.add_argument(
        "--coordinator-public-key",
        type=Path,
        help="model-signing public key (default: coordinator.pub next to --key)",
    )
    p.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="the site's policy, checked against every request of the coordinator "
        "(default: STATE_DIR/site_policy.toml; write one with `fedinfer site init-policy`)",
    )
    p.add_argument("--no-serve", action="store_true", help="do not start the inference server")
    p.add_argument("--serve-host", default="127.0.0.1", help="inference server bind address")
    p.add_argument("--serve-port", type=int, default=8080, help="inference server port (0: free)")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra `fedinfer serve` argument (repeatable), e.g. --serve-arg=--auth-tokens=t.json",
    )
    p.add_argument(
        "--connect-attempts",
        type=int,
        default=0,
        help="give up after N failed connection attempts in a row (default: 0, never)",
    )
    p.add_argument(
        "--supernode-idle-poll-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long an idle SuperNode waits before asking the coordinator again "
        "(default: 0.5; Flower's own: 3)",
    )
    p.add_argument(
        "--state-key",
        type=Path,
        metavar="FILE",
        help="encrypt models, ledger and audit log at rest with this key "
        "(fedinfer keys init-site-key; keep it outside --state-dir; "
        "default: $FEDINFER_STATE_KEY_FILE, else plaintext)",
    )
    p.set_defaults(func=_site)


def _site_init_policy(ns: argparse.Namespace) -> int:
    from fedinfer.policy import POLICY_FILENAME, SitePolicy, save_policy

    pinned = None
    if ns.coordinator_public_key is not None:
        from fedinfer.artifacts import key_fingerprint, load_public_key

        pinned = key_fingerprint(load_public_key(ns.coordinator_public_key))
    policy = SitePolicy(coordinator_key_fingerprint=pinned)
    path = save_policy(policy, Path(ns.state_dir) / POLICY_FILENAME)
    print(f"wrote the strict default site policy {path}; edit it, then start the site")
    if pinned:
        print(f"coordinator signing key pinned: {pinned}")
    print(
        f"then: `fedinfer site identity {ns.state_dir} --name NAME` prints this site's line "
        "for its peers; collect every site's line in a file and name it in "
        "`secagg_trusted_peers` (docs/deployment.md)"
    )
    return 0


def _site_identity(ns: argparse.Namespace) -> int:
    import sys

    from fedinfer.crypto.at_rest import check_state_dir, resolve_state_key
    from fedinfer.policy.peers import identity_fingerprint, peer_line
    from fedinfer.secagg.store import RunStateStore

    state_dir = Path(ns.state_dir)
    key = resolve_state_key(ns.state_key, protects=[state_dir])
    check_state_dir(state_dir, key)  # a wrong or missing key is one line, not a new identity
    public = RunStateStore(state_dir, key=key).identity_public()
    name = ns.name or state_dir.resolve().name
    print(peer_line(name, public))
    print(
        f"site {name}: identity fingerprint {identity_fingerprint(public)}; add the line above "
        "to each peer's `secagg_trusted_peers` file and read them the fingerprint",
        file=sys.stderr,
    )
    return 0


def _warn_without_peers(ns: argparse.Namespace) -> None:
    """Say at start-up when the site's policy names no trusted peers.

    A warning on stdout: stderr's first line stays the reason a site refuses to start.
    """
    from fedinfer.policy import POLICY_FILENAME, load_policy

    try:  # run_site reports a missing or bad policy, with the rest of the checks
        policy = load_policy(Path(ns.policy or Path(ns.state_dir) / POLICY_FILENAME))
    except ConfigError:
        return
    if policy.secagg_trusted_peers is None:
        print(
            f"site {ns.name}: warning: the policy names no `secagg_trusted_peers`; in secure "
            "aggregation the site accepts any participant with endorsed keys, even sites a "
            "coordinator makes up (Sybils) to unmask one site's update. List the real sites' "
            "`fedinfer site identity` lines in a peers file (docs/deployment.md)",
            flush=True,
        )


def _site(ns: argparse.Namespace) -> int:
    from fedinfer.deploy.site import SiteOptions, run_site

    required = ("name", "data", "state_dir", "coordinator", "ca", "key")
    missing = [f"--{k.replace('_', '-')}" for k in required if getattr(ns, k) is None]
    if missing:
        raise ConfigError(f"`fedinfer site` needs {', '.join(missing)}")
    public_key = ns.coordinator_public_key or Path(ns.key).parent / "coordinator.pub"
    _warn_without_peers(ns)
    return run_site(
        SiteOptions(
            name=ns.name,
            data=ns.data,
            state_dir=ns.state_dir,
            coordinator=ns.coordinator,
            ca_cert=ns.ca,
            node_key=ns.key,
            coordinator_public_key=public_key,
            serve=not ns.no_serve,
            serve_host=ns.serve_host,
            serve_port=ns.serve_port,
            serve_args=ns.serve_arg,
            connect_attempts=ns.connect_attempts,
            **(
                {"supernode_idle_poll_s": ns.supernode_idle_poll_s}
                if ns.supernode_idle_poll_s is not None
                else {}
            ),
            state_key=ns.state_key,
            policy=ns.policy,
        )
    )


# --------------------------------------------------------------------------- deploy
def _add_deploy(subparsers: Any) -> None:
    p = subparsers.add_parser("deploy", help="ready-made deployments")
    sub = p.add_subparsers(dest="deploy_command", metavar="KIND", required=True)
    local = sub.add_parser(
        "local", help="CA, coordinator and N sites on this machine over loopback, end to end"
    )
    local.add_argument("--sites", type=int, default=3, help="number of sites (default: 3)")
    local.add_argument("--rounds", type=int, default=2, help="federation rounds (default: 2)")
    local.add_argument(
        "--workdir",
        type=Path,
        default=Path("outputs/deploy-local"),
        help="everything goes here (default: outputs/deploy-local)",
    )
    local.add_argument("--port", type=int, default=0, help="Fleet gateway port (0: free)")
    local.add_argument(
        "--data-layout",
        default="npz",
        help="how each site's data is written: npz (one file, default), folder (class folders of "
        ".npy), png (class folders of PNG images) or shards (NPZ shards); the last three are "
        "read lazily",
    )
    local.add_argument(
        "--keep-alive", action="store_true", help="keep the sites serving until Ctrl-C"
    )
    local.add_argument(
        "--no-state-encryption",
        action="store_true",
        help="keep the sites' state in plaintext (default: encrypted at rest, "
        "one key per site in <workdir>/keys/)",
    )
    local.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. secagg=off privacy=none")
    local.set_defaults(func=_deploy_local)


def _deploy_local(ns: argparse.Namespace) -> int:
    from fedinfer.deploy.local import deploy_local

    return deploy_local(  # checks every option and the config before writing anything
        workdir=ns.workdir,
        num_sites=ns.sites,
        rounds=ns.rounds,
        overrides=ns.overrides,
        port=ns.port,
        keep_alive=ns.keep_alive,
        encrypt_state=not ns.no_state_encryption,
        data_layout=ns.data_layout,
    )


# --------------------------------------------------------------------------- status
def _add_status(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status", help="connected sites, rounds and site servers of a deployment"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        required=True,
        help="a coordinator's --workdir, or a `deploy local` directory",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _status(ns: argparse.Namespace) -> int:
    from fedinfer.deploy.status import collect_status, render_status

    status = collect_status(ns.workdir)
    print(json.dumps(status, indent=2) if ns.json else render_status(status))
    return 0
