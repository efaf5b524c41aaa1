"""Attacks by an active coordinator on secure aggregation (issue 11, item 4), as tests.

Both attacks recovered one site's exact contribution on the code before the fix (see
the report on branch ``secagg``: the same steps without signatures or a state file):

- *replayed round*: set-up re-run for a resumed run reset the site's state and its
  replay guard; round r masked twice, once with all sites and once with one fewer,
  and the difference of the two honest sums is that site's weighted update;
- *split view*: with n=5 and the default threshold 0.6, each site was given its own
  survivor list; together the sites revealed a share of the target's self-mask seed
  from three sites and every pairwise seed of the target, unmasking its upload alone.

Every site is rebuilt from its serialized state between exchanges and every message
crosses the wire form, as with Flower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedinfer.crypto.at_rest import StateKey
from fedinfer.errors import SecAggAbort, StateKeyError
from fedinfer.secagg import (
    ConsistencyRequest,
    MaskedUpload,
    ServerSecAgg,
    SiteSecAgg,
    UnmaskRequest,
    resolve_threshold,
)
from fedinfer.policy import load_peers
from fedinfer.secagg.store import RunStateStore, open_site

RUN = 42
DIM = 32


def wire(message: Any) -> Any:
    return type(message).from_wire(message.to_wire())


def federation(n: int, seed: int) -> tuple[list[int], dict[int, np.ndarray], dict[int, int]]:
    rng = np.random.default_rng(seed)
    ids = sorted(int(i) for i in rng.choice(2**40, size=n, replace=False))
    updates = {i: rng.normal(scale=0.3, size=DIM).astype(np.float32) for i in ids}
    weights = {i: int(rng.integers(10, 500)) for i in ids}
    return ids, updates, weights


# --- replayed / resumed round ------------------------------------------------------------


class Site:
    """A site whose secure-aggregation state lives only in its state directory."""

    def __init__(self, site_id: int, state_dir: Path, key: StateKey | None = None) -> None:
        self.site_id, self.store = site_id, RunStateStore(state_dir, key=key)

    def setup(self) -> Any:
        site, created = open_site(self.store, site_id=self.site_id, run_id=RUN)
        if created:
            self.store.save(RUN, site.to_state())
        return wire(site.setup_reply())

    def _do(self, step: str, message: Any, **kwargs: Any) -> Any:
        site = SiteSecAgg.from_state(self.store.load(RUN))
        reply = getattr(site, step)(wire(message), **kwargs)
        self.store.save(RUN, site.to_state())  # before the reply leaves
        return wire(reply)

def _mask(site: Site, server: ServerSecAgg, update: np.ndarray, weight: int) -> MaskedUpload:
    s = SiteSecAgg.from_state(site.store.load(RUN))
    upload = s.mask_update(wire(server.config), update, weight=weight)
    site.store.save(RUN, s.to_state())
    return wire(upload)


def honest_round(
    sites: dict[int, Site], server_round: int, updates: dict, weights: dict
) -> np.ndarray:
    """One full round among ``sites``, set-up included; returns the exact weighted sum."""
    directory = {i: site.setup().public_keys for i, site in sites.items()}
    server = ServerSecAgg(
        run_id=RUN,
        server_round=server_round,
        participants=directory,
        threshold=resolve_threshold(0.6, num_sites=len(sites)),
        dim=DIM,
        clip_range=1.0,
        bits=16,
    )
    for i, site in sites.items():
        server.receive_upload(_mask(site, server, updates[i], weights[i]))
    for request in server.consistency_requests().values():
        server.receive_consistency_reply(sites[request.site_id]._do("sign_survivors", request))
    for request in server.unmask_requests().values():
        server.receive_unmask_reply(sites[request.site_id]._do("unmask", request))
    return server.finalize().weighted_sum


def test_replayed_round_after_a_resumed_set_up_is_refused(tmp_path: Path) -> None:
    """Attack: re-ask round 1 (the run resumed) without the target; subtract the two sums."""
    # Prepare: round 1 among all five sites
    ids, updates, weights = federation(5, seed=1)
    sites = {i: Site(i, tmp_path / f"site-{i}") for i in ids}
    full = honest_round(sites, 1, updates, weights)
    others = {i: s for i, s in sites.items() if i != ids[2]}
    # Execute / Assert: the coordinator resumes the run and asks round 1 again without the
    # target (full - partial would be its weighted update): every site refuses
    with pytest.raises(SecAggAbort, match="rounds must increase"):
        honest_round(others, 1, updates, weights)
    # the sites kept their keys (set-up did not reset the run), so the next round works
    assert np.array_equal(honest_round(sites, 2, updates, weights), full)


def test_lower_round_and_restarted_site_are_refused(tmp_path: Path) -> None:
    ids, updates, weights = federation(4, seed=2)
    sites = {i: Site(i, tmp_path / f"site-{i}") for i in ids}
    honest_round(sites, 5, updates, weights)
    restarted = {i: Site(i, tmp_path / f"site-{i}") for i in ids}  # new processes, same disk
    for server_round in (5, 3):
        with pytest.raises(SecAggAbort, match="rounds must increase"):
            honest_round(restarted, server_round, updates, weights)


def test_set_up_twice_returns_the_same_keys(tmp_path: Path) -> None:
    site = Site(7, tmp_path)
    assert site.setup() == site.setup() == Site(7, tmp_path).setup()


def test_run_state_is_sealed_with_the_state_key(tmp_path: Path) -> None:
    key = StateKey.generate()
    site = Site(7, tmp_path, key=key)
    site.setup()
    state = SiteSecAgg.from_state(site.store.load(RUN))
    blob = site.store.path(RUN).read_bytes()
    assert state.to_state()["sign_private"].hex() not in blob.hex()  # type: ignore[union-attr]
    with pytest.raises(StateKeyError):
        RunStateStore(tmp_path, key=None).load(RUN)
    with pytest.raises(StateKeyError):
        RunStateStore(tmp_path, key=StateKey.generate()).load(RUN)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    site.store.path(RUN).write_bytes(bytes(tampered))
    with pytest.raises(SecAggAbort, match="fails authentication"):
        site.store.load(RUN)


def test_round_of_another_run_is_refused(tmp_path: Path) -> None:
    ids, updates, weights = federation(3, seed=3)
    site = Site(ids[0], tmp_path)
    directory = {i: Site(i, tmp_path / str(i)).setup() for i in ids[1:]}
    directory[ids[0]] = site.setup()
    server = ServerSecAgg(
        run_id=RUN + 1,
        server_round=1,
        participants={i: r.public_keys for i, r in directory.items()},
        threshold=2,
        dim=DIM,
        clip_range=1.0,
        bits=16,
    )
    with pytest.raises(SecAggAbort, match="set up for run"):
        _mask(site, server, updates[ids[0]], weights[ids[0]])


# --- split view: per-site survivor lists -------------------------------------------------


def split_views(ids: list[int]) -> dict[int, tuple[int, ...]]:
    """Survivor list per site that unmasks ``X = ids[0]`` alone when n=5, t=3.

    X hears that A, B survived (reveals s_XC, s_XD and its share of b_X); A and B hear that
    X dropped (reveal s_XA, s_XB); C and D hear that X survived (reveal shares of b_X).
    """
    x, a, b, c, d = ids
    return {x: (x, a, b), a: (a, b, c, d), b: (a, b, c, d), c: (c, d, x), d: (c, d, x)}


def _uploaded(n: int = 5) -> tuple[list[int], dict[int, dict], dict[int, MaskedUpload], Any]:
    ids, updates, weights = federation(n, seed=4)
    states = {i: SiteSecAgg.create(i).to_state() for i in ids}
    server = ServerSecAgg(
        run_id=RUN,
        server_round=1,
        participants={i: SiteSecAgg.from_state(s).public_keys for i, s in states.items()},
        threshold=resolve_threshold(0.6, num_sites=n),  # the default: 3 of 5
        dim=DIM,
        clip_range=1.0,
        bits=16,
    )
    uploads = {}
    for i in ids:
        agent = SiteSecAgg.from_state(states[i])
        uploads[i] = wire(agent.mask_update(wire(server.config), updates[i], weight=weights[i]))
        states[i] = agent.to_state()
        server.receive_upload(uploads[i])  # the coordinator also keeps every upload
    return ids, states, uploads, server


def _request(site: int, survivors: tuple[int, ...], ids: list[int], uploads: dict, sigs: dict):
    return UnmaskRequest(
        site_id=site,
        server_round=1,
        survivors=tuple(sorted(survivors)),
        dropped=tuple(i for i in ids if i not in survivors),
        sealed_shares={s: uploads[s].sealed_shares[site] for s in survivors},
        signatures=sigs,
    )


@pytest.mark.parametrize("forwarded", ["every-signature", "own-only", "upload-signatures"])
def test_split_survivor_lists_are_refused_before_anything_is_revealed(forwarded: str) -> None:
    # Prepare
    ids, states, uploads, _server = _uploaded()
    views = split_views(ids)
    signatures: dict[int, bytes] = {}
    for site, survivors in views.items():  # each site signs the list it was shown
        agent = SiteSecAgg.from_state(states[site])
        reply = agent.sign_survivors(ConsistencyRequest(site, 1, survivors))
        states[site] = agent.to_state()
        signatures[site] = reply.signature
    # Execute / Assert: whatever signatures the coordinator forwards, no site reveals
    for site, survivors in views.items():
        sigs = {
            "every-signature": {s: signatures[s] for s in survivors},
            "own-only": {site: signatures[site]},
            "upload-signatures": {s: uploads[s].signature for s in survivors},
        }[forwarded]
        agent = SiteSecAgg.from_state(states[site])
        with pytest.raises(SecAggAbort, match="refusing to unmask"):
            agent.unmask(wire(_request(site, survivors, ids, uploads, sigs)))


def test_site_that_signed_a_list_refuses_the_no_dropout_path() -> None:
    """A site commits to one list: once it signed a short list it will not unmask the full one."""
    ids, states, uploads, _server = _uploaded()
    site = ids[1]
    agent = SiteSecAgg.from_state(states[site])
    agent.sign_survivors(ConsistencyRequest(site, 1, tuple(ids[1:])))
    full = _request(site, tuple(ids), ids, uploads, {i: uploads[i].signature for i in ids})
    with pytest.raises(SecAggAbort, match="not the one this site committed to"):
        agent.unmask(wire(full))
    with pytest.raises(SecAggAbort, match="second survivor list"):
        agent.sign_survivors(ConsistencyRequest(site, 1, tuple(ids[:4])))


def test_no_dropout_round_needs_no_consistency_exchange() -> None:
    ids, states, uploads, server = _uploaded()
    assert server.consistency_requests() == {}
    for request in server.unmask_requests().values():
        agent = SiteSecAgg.from_state(states[request.site_id])
        server.receive_unmask_reply(wire(agent.unmask(wire(request))))
    assert server.finalize().survivors == tuple(ids)


# --- site-side floor ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "threshold", "floor", "refused"),
    [
        (5, 2, {}, "threshold 2 of 5"),
        (4, 2, {}, "threshold 2 of 4"),  # exactly half: two disjoint halves
        (2, 2, {}, "below this site's minimum 3"),
        (5, 3, {"min_threshold_fraction": 0.7}, "threshold 3 of 5"),  # 3 < 0.7 x 5
        (5, 3, {"min_threshold_fraction": 0.6}, None),  # at least 0.6 x 5, as the policy reads
        (5, 3, {}, None),
        (3, 2, {}, None),
    ],
)
def test_site_refuses_a_threshold_below_its_floor(
    n: int, threshold: int, floor: dict[str, Any], refused: str | None
) -> None:
    ids, updates, weights = federation(n, seed=5)
    sites = {i: SiteSecAgg.create(i, **floor) for i in ids}
    server = ServerSecAgg(
        run_id=RUN,
        server_round=1,
        participants={i: s.public_keys for i, s in sites.items()},
        threshold=threshold,
        dim=DIM,
        clip_range=1.0,
        bits=16,
    )
    site = sites[ids[0]]
    if refused is None:
        site.mask_update(wire(server.config), updates[ids[0]], weight=weights[ids[0]])
        return
    with pytest.raises(SecAggAbort, match=refused):
        site.mask_update(wire(server.config), updates[ids[0]], weight=weights[ids[0]])
    assert site.last_round == -1, "a refused round leaves the replay guard untouched"


def test_interrupted_round_may_be_re_asked_but_then_only_one_sum_is_unmasked(
    tmp_path: Path,
) -> None:
    """A coordinator that crashed after the uploads re-asks the round: sites mask again, and
    the first round's uploads can no longer be unmasked (the sites hold the new round only)."""
    # Prepare: round 1 masked by all, nothing revealed (the coordinator crashed)
    ids, updates, weights = federation(5, seed=6)
    sites = {i: Site(i, tmp_path / f"site-{i}") for i in ids}
    directory = {i: site.setup().public_keys for i, site in sites.items()}

    def new_round() -> ServerSecAgg:
        return ServerSecAgg(
            run_id=RUN,
            server_round=1,
            participants=directory,
            threshold=3,
            dim=DIM,
            clip_range=1.0,
            bits=16,
        )

    first = new_round()
    for i, site in sites.items():
        first.receive_upload(_mask(site, first, updates[i], weights[i]))
    # Execute: the resumed coordinator asks round 1 again and completes it
    second = new_round()
    for i, site in sites.items():
        second.receive_upload(_mask(site, second, updates[i], weights[i]))
    stale = first.unmask_requests()
    assert second.consistency_requests() == {}
    for request in second.unmask_requests().values():
        second.receive_unmask_reply(sites[request.site_id]._do("unmask", request))
    second.finalize()
    # Assert: no site helps unmask the first attempt, and round 1 cannot be asked a third time
    for request in stale.values():
        with pytest.raises(SecAggAbort, match="refusing to unmask|fails authentication|already"):
            sites[request.site_id]._do("unmask", request)
    with pytest.raises(SecAggAbort, match="rounds must increase"):
        _mask(sites[ids[0]], new_round(), updates[ids[0]], weights[ids[0]])


# --- set-up keys endorsed by the site's identity key ----------------------------------------


def _endorsed_sites(tmp_path: Path, n: int, **options: Any) -> dict[int, SiteSecAgg]:
    ids, _, _ = federation(n, seed=7)
    return {
        i: SiteSecAgg.create(
            i,
            run_id=RUN,
            identity=RunStateStore(tmp_path / str(i), key=None).identity(),
            require_endorsed=True,
            **options,
        )
        for i in ids
    }


def _round_for(directory: dict, run_id: int = RUN) -> ServerSecAgg:
    return ServerSecAgg(
        run_id=run_id,
        server_round=1,
        participants=directory,
        threshold=2,
        dim=DIM,
        clip_range=1.0,
        bits=16,
    )


def test_identity_key_is_pinned_in_the_state_directory(tmp_path: Path) -> None:
    first = RunStateStore(tmp_path, key=StateKey.generate())
    assert first.identity() == first.identity()
    assert RunStateStore(tmp_path / "other", key=None).identity() != first.identity()


def test_coordinator_substituted_peer_keys_are_refused(tmp_path: Path) -> None:
    """Attack: the coordinator lists its own keys for a peer (to read that peer's shares)."""
    sites = _endorsed_sites(tmp_path, 3)
    ids = sorted(sites)
    directory = {i: wire(s.setup_reply()).public_keys for i, s in sites.items()}
    rogue_identity = RunStateStore(tmp_path / "x", key=None).identity()
    rogue = SiteSecAgg.create(ids[1], run_id=RUN, identity=rogue_identity)
    cases = {
        "unendorsed": SiteSecAgg.create(ids[1]).public_keys,
        "endorsed for another run": wire(
            SiteSecAgg.create(ids[1], run_id=RUN + 1, identity=rogue_identity).setup_reply()
        ).public_keys,
    }
    victim = sites[ids[0]]
    for keys in cases.values():
        server = _round_for({**directory, ids[1]: keys})
        with pytest.raises(SecAggAbort, match="not endorsed"):
            victim.mask_update(wire(server.config), np.zeros(DIM), weight=1)
    # endorsed by an identity the site does not trust (it knows its peers' identities)
    trusted = {k.identity for k in directory.values()}
    strict = SiteSecAgg.from_state(
        victim.to_state(),
        identity=victim._identity,
        require_endorsed=True,
        trusted_identities=trusted,
    )
    server = _round_for({**directory, ids[1]: wire(rogue.setup_reply()).public_keys})
    with pytest.raises(SecAggAbort, match="does not trust"):
        strict.mask_update(wire(server.config), np.zeros(DIM), weight=1)
    honest = _round_for(directory)
    strict.mask_update(wire(honest.config), np.zeros(DIM), weight=1)


def test_run_state_lock_serializes_read_modify_write(tmp_path: Path) -> None:
    """Two messages of one site (e.g. a dead coordinator's and a resumed one's) take turns."""
    import threading

    store, events = RunStateStore(tmp_path, key=None), []

    def other() -> None:
        with store.locked(RUN):
            events.append("other")

    with store.locked(RUN):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive(), "the second holder must wait for the first"
        events.append("first")
    thread.join()
    assert events == ["first", "other"]


# --- through Flower ------------------------------------------------------------------------


def test_flower_round_with_a_dropout_runs_the_consistency_check(tmp_path: Path) -> None:
    """Real Flower (in-process runtime): a site drops after set-up, the survivors sign the
    survivor list, the round aggregates; each site's state directory holds its run state."""
    from fedinfer.simulation import run_simulation
    from tests.conftest import tiny_config

    cfg = tiny_config("privacy=none", "federation.rounds=1", "faults.drop_sites=1")
    run_simulation(cfg, output_dir=tmp_path)
    info = json.loads((tmp_path / "results.json").read_text())["rounds"][0]["secagg"]
    assert info["consistency_check"] is True
    assert (info["participants"], info["survivors"], info["dropped"]) == (4, 3, 1)
    for site_dir in sorted((tmp_path / "sites").iterdir()):
        assert len(list((site_dir / "secagg").glob("run-*.json"))) == 1
        assert (site_dir / "secagg" / "identity.key").exists()
    # the sites of a simulation trust exactly each other's identity keys: the check ran
    peers = load_peers(tmp_path / "secagg_peers.toml")
    assert peers == {
        d.name: RunStateStore(d, key=None).identity_public()
        for d in sorted((tmp_path / "sites").iterdir())
    }
    assert len(peers) == 4


def test_simulated_sites_refuse_a_participant_missing_from_their_peers(tmp_path: Path) -> None:
    """A peers file without one of the sites: the others refuse every round with it."""
    from fedinfer.policy import save_peers
    from fedinfer.simulation import run_simulation
    from tests.conftest import tiny_config

    # Prepare: the peers of sites 00-02 only (as if site-03 were the coordinator's own)
    names = [f"site-0{i}" for i in range(3)]
    peers = {n: RunStateStore(tmp_path / "sites" / n, key=None).identity_public() for n in names}
    path = save_peers(peers, tmp_path / "three.toml")
    cfg = tiny_config(
        "privacy=none", "federation.rounds=1", f"site_policy.secagg_trusted_peers={path}"
    )
    # Execute
    run_simulation(cfg, output_dir=tmp_path)
    # Assert
    first = json.loads((tmp_path / "results.json").read_text())["rounds"][0]
    refused = json.dumps(first)
    assert refused.count("policy secagg_trusted_peers") == 3, first


# --- Sybil sites: participants of the coordinator's own making ------------------------------


def _sybil_attack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str
) -> tuple[Any, dict[str, Any]]:
    """A coordinator runs a round of one honest site and two Sybils whose keys it holds.

    Every Sybil carries keys endorsed by an identity key of the coordinator's own making,
    so the round passes every check but trust in the identities. The honest site is a real
    ClientApp (real training, its policy, its state directory) reached over an in-process
    grid; the coordinator answers for the Sybils itself. Returns the site's reply to the
    train message and what the coordinator learned: ``{"update", "weight", "true_update",
    "true_weight"}`` when the round completed.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    import fedinfer.fl.secagg_site as secagg_site
    from fedinfer.data import build_federated_data
    from fedinfer.fl.client_app import build_client_app
    from fedinfer.fl.grid import InProcessGrid
    from fedinfer.fl.messages import Keys, MessageTypes
    from fedinfer.fl.records import weights_to_arrays
    from fedinfer.fl.secagg_codec import config_to_wire, wire_to_records
    from fedinfer.fl.secagg_site import RUN_ID, UPLOAD_ARRAYS
    from fedinfer.fl.site import simulation_resolver
    from fedinfer.models import build_model
    from fedinfer.secagg import SetupReply, flatten_arrays
    from fedinfer.secagg.keys import new_identity
    from fedinfer.tasks import num_outputs
    from fedinfer.training import get_weights
    from tests.conftest import tiny_config

    cfg = tiny_config("privacy=none", "federation.num_sites=3", *overrides)
    app = build_client_app(
        config_fn=lambda context: cfg,
        resolver_fn=lambda c: simulation_resolver(
            c, output_dir=tmp_path, coordinator_public_key=None
        ),
    )
    grid = InProcessGrid(app, num_nodes=cfg.federation.num_sites, run_id=1, seed=0)
    victim = sorted(grid.get_node_ids())[0]

    def ask(content: RecordDict, message_type: str) -> Message:
        (reply,) = grid.send_and_receive([Message(content, victim, message_type)])
        return reply

    # set-up: the honest site's real, endorsed run keys
    reply = ask(RecordDict({Keys.SECAGG: ConfigRecord({RUN_ID: RUN})}), MessageTypes.SECAGG_SETUP)
    directory = {
        victim: SetupReply.from_wire(config_to_wire(reply.content[Keys.SECAGG])).public_keys
    }
    # two Sybils, each with an identity key the coordinator made for it
    sybils = {
        i: SiteSecAgg.create(i, run_id=RUN, identity=new_identity(), require_endorsed=True)
        for i in (victim + 1, victim + 2)
    }
    directory |= {i: wire(s.setup_reply()).public_keys for i, s in sybils.items()}
    data = build_federated_data(cfg)
    model = build_model(
        cfg.model, input_dim=data.input_dim, num_classes=num_outputs(cfg.task.kind, 10)
    )
    global_weights = get_weights(model)
    vector, _ = flatten_arrays(global_weights)
    server = ServerSecAgg(
        run_id=RUN,
        server_round=1,
        participants=directory,
        threshold=2,  # the site's floor for 3 participants: more than half
        dim=vector.size,
        clip_range=cfg.secagg.clip_range,
        bits=cfg.secagg.bits,
    )
    trained: dict[str, Any] = {}
    real_train = secagg_site.local_train

    def spy(**kwargs: Any) -> Any:  # records what the site really trained, changes nothing
        trained["outcome"] = real_train(**kwargs)
        trained["weight"] = len(kwargs["env"].data.train)
        return trained["outcome"]

    monkeypatch.setattr(secagg_site, "local_train", spy)
    round_record, _ = wire_to_records(server.config.to_wire())
    content = RecordDict(
        {
            Keys.ARRAYS: weights_to_arrays(global_weights),
            Keys.CONFIG: ConfigRecord({Keys.SERVER_ROUND: 1, Keys.RUN_ID: "sybil"}),
            Keys.SECAGG: round_record,
        }
    )
    reply = ask(content, "train")
    if reply.has_error():
        return reply, {"trained": bool(trained)}
    upload = MaskedUpload.from_wire(
        config_to_wire(reply.content[Keys.SECAGG], reply.content[UPLOAD_ARRAYS])
    )
    server.receive_upload(upload)
    for s in sybils.values():  # the Sybils "train" nothing
        server.receive_upload(wire(s.mask_update(server.config, np.zeros(vector.size), weight=1)))
    # exchange 2 among the Sybils alone: the honest site is never asked to reveal anything
    for i, request in server.unmask_requests().items():
        if i in sybils:
            server.receive_unmask_reply(wire(sybils[i].unmask(wire(request))))
    result = server.finalize()
    new_vector, _ = flatten_arrays(trained["outcome"].weights)
    weight = result.total_weight - len(sybils)  # the Sybils' weights are the coordinator's own
    learned = {
        "weight": weight,
        "update": result.mean_update * result.total_weight / weight,
        "true_weight": trained["weight"],
        "true_update": new_vector - vector,
    }
    return reply, learned


def test_sybil_round_unmasks_one_site_without_trusted_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: a round of one honest site and two Sybils. The site accepts it (every key is
    endorsed), and the Sybils' shares of its self-mask seed unmask its update alone. This
    is what a site without ``secagg_trusted_peers`` still risks; it says so once per run."""
    from fedinfer.secagg import quantization_bound

    # Execute: the site's policy names no trusted peers (the old default)
    reply, learned = _sybil_attack(tmp_path, monkeypatch)
    assert "names no `secagg_trusted_peers`" in caplog.text
    # Assert: the coordinator learned the site's exact sample count and its update
    assert not reply.has_error(), reply.error.reason
    assert learned["weight"] == learned["true_weight"]
    bound = quantization_bound(1.0, 16)
    assert np.abs(learned["true_update"]).max() > 10 * bound  # not a trivial update
    np.testing.assert_allclose(
        learned["update"], learned["true_update"], atol=2 * bound
    )


def test_sybil_round_is_refused_by_a_site_that_knows_its_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same attack on a site whose policy lists its real peers' identity keys: refused
    by the policy, naming the key and the fix, before it trains or uploads anything."""
    from fedinfer.data import site_name
    from fedinfer.fl.messages import ErrorCodes
    from fedinfer.policy.peers import save_peers

    # Prepare: the three real sites' identity keys, as `fedinfer site identity` exports them
    peers = {
        site_name(i): RunStateStore(tmp_path / "sites" / site_name(i), key=None).identity_public()
        for i in range(3)
    }
    path = save_peers(peers, tmp_path / "secagg_peers.toml")
    # Execute
    reply, learned = _sybil_attack(
        tmp_path, monkeypatch, f"site_policy.secagg_trusted_peers={path}"
    )
    # Assert
    assert reply.has_error() and learned == {"trained": False}
    assert reply.error.code == ErrorCodes.POLICY_REFUSED
    reason = reply.error.reason
    assert reason.startswith("policy secagg_trusted_peers:"), reason
    assert "2 participant(s)" in reason and "fedinfer site identity" in reason


@pytest.mark.parametrize("case", ["copied identity", "one peer vouches twice", "honest"])
def test_sybils_posing_as_trusted_peers_are_refused(tmp_path: Path, case: str) -> None:
    """A Sybil that shows a listed identity key without its endorsement, or a colluding peer
    that endorses a second participant, is refused like any stranger; real peers pass."""
    from fedinfer.secagg import PublicKeys
    from fedinfer.secagg.keys import new_identity
    from fedinfer.secagg.site import untrusted_participants

    # Prepare: three real sites that know each other's identity keys
    sites = _endorsed_sites(tmp_path, 3)
    ids = sorted(sites)
    directory = {i: wire(s.setup_reply()).public_keys for i, s in sites.items()}
    trusted = {k.identity for k in directory.values()}
    sybil_id = max(ids) + 1
    if case == "copied identity":  # a listed key, endorsed by the coordinator's own
        own = SiteSecAgg.create(sybil_id, run_id=RUN, identity=new_identity()).public_keys
        keys = PublicKeys(own.enc, own.mask, own.sign, directory[ids[1]].identity, own.endorsement)
        directory[sybil_id] = keys
    elif case == "one peer vouches twice":  # site ids[2] colludes with the coordinator
        colluder = sites[ids[2]]._identity
        directory[sybil_id] = SiteSecAgg.create(sybil_id, run_id=RUN, identity=colluder).public_keys
    victim = SiteSecAgg.from_state(
        sites[ids[0]].to_state(),
        identity=sites[ids[0]]._identity,
        require_endorsed=False,  # only the trusted list stands between the site and the Sybil
        trusted_identities=trusted,
    )
    server = _round_for(directory)
    # Execute / Assert
    strangers = untrusted_participants(server.config, trusted, site_id=ids[0])
    if case == "honest":
        assert strangers == []
        victim.mask_update(wire(server.config), np.zeros(DIM), weight=1)
        return
    assert sybil_id in strangers
    with pytest.raises(SecAggAbort, match="does not trust"):
        victim.mask_update(wire(server.config), np.zeros(DIM), weight=1)
