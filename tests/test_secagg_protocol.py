"""The secure-aggregation protocol end to end: masks cancel, dropouts recover, sites refuse.

Every message crosses a simulated wire (``to_wire`` / ``from_wire``) and every site is
rebuilt from its serialized state between exchanges, as in Flower's Context.state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedinfer.errors import ConfigError, SecAggAbort
from fedinfer.secagg import (
    AggregateResult,
    ConsistencyReply,
    ConsistencyRequest,
    MaskedUpload,
    PublicKeys,
    RoundConfig,
    ServerSecAgg,
    SetupReply,
    SiteSecAgg,
    UnmaskReply,
    UnmaskRequest,
    quantization_bound,
    quantize,
    resolve_threshold,
)
from fedinfer.secagg.quantize import encode_contribution

CHI2_UNIFORM_BYTES_LIMIT = 481.0  # df = 255; see test_secagg_crypto.py


def byte_chi2(vector: np.ndarray) -> float:
    counts = np.bincount(vector.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


# --- harness: sites keep only serialized state, messages cross a wire --------------------


def wire(message: Any) -> Any:
    return type(message).from_wire(message.to_wire())


# Sites keep their threshold floor (above half the participants) but accept two-site rounds,
# so the mask arithmetic is checked down to n = 2; the floors have their own tests.
NO_FLOOR = {"min_threshold_fraction": 0.5, "min_participants": 2}


def agent_of(state: Mapping[str, Any]) -> SiteSecAgg:
    return SiteSecAgg.from_state(state, **NO_FLOOR)


def make_states(ids: Collection[int]) -> dict[int, dict[str, Any]]:
    return {i: SiteSecAgg.create(i).to_state() for i in ids}


def directory(states: Mapping[int, dict[str, Any]]) -> dict[int, PublicKeys]:
    replies = [wire(agent_of(s).setup_reply()) for s in states.values()]
    return {r.site_id: r.public_keys for r in replies}


def new_server(
    states: Mapping[int, dict[str, Any]],
    *,
    server_round: int = 1,
    threshold: int,
    dim: int,
    clip_range: float = 1.0,
    bits: int = 16,
) -> ServerSecAgg:
    return ServerSecAgg(
        run_id=42,
        server_round=server_round,
        participants=directory(states),
        threshold=threshold,
        dim=dim,
        clip_range=clip_range,
        bits=bits,
    )


def upload(
    states: dict[int, dict[str, Any]],
    site: int,
    config: RoundConfig,
    update: np.ndarray,
    weight: int,
) -> MaskedUpload:
    agent = agent_of(states[site])
    message = agent.mask_update(wire(config), update, weight=weight)
    states[site] = agent.to_state()
    return wire(message)


def answer(states: dict[int, dict[str, Any]], request: UnmaskRequest) -> UnmaskReply:
    agent = agent_of(states[request.site_id])
    reply = agent.unmask(wire(request))
    states[request.site_id] = agent.to_state()
    return wire(reply)


def sign_list(states: dict[int, dict[str, Any]], request: ConsistencyRequest) -> ConsistencyReply:
    agent = agent_of(states[request.site_id])
    reply = agent.sign_survivors(wire(request))
    states[request.site_id] = agent.to_state()
    return wire(reply)


def check_consistency(states: dict[int, dict[str, Any]], server: ServerSecAgg) -> None:
    """The consistency exchange (a no-op when every participant uploaded)."""
    for request in server.consistency_requests().values():
        server.receive_consistency_reply(sign_list(states, request))


def run_round(
    states: dict[int, dict[str, Any]],
    updates: Mapping[int, np.ndarray],
    weights: Mapping[int, int],
    *,
    threshold: int,
    drop_after_keys: Collection[int] = (),
    drop_after_upload: Collection[int] = (),
    server_round: int = 1,
    clip_range: float = 1.0,
    bits: int = 16,
) -> AggregateResult:
    dim = len(next(iter(updates.values())))
    server = new_server(
        states,
        server_round=server_round,
        threshold=threshold,
        dim=dim,
        clip_range=clip_range,
        bits=bits,
    )
    for site in states:
        if site not in drop_after_keys:
            server.receive_upload(upload(states, site, server.config, updates[site], weights[site]))
    check_consistency(states, server)
    for site, request in server.unmask_requests().items():
        if site not in drop_after_upload:
            server.receive_unmask_reply(answer(states, request))
    return server.finalize()


def plain_sum(
    updates: Mapping[int, np.ndarray],
    weights: Mapping[int, int],
    sites: Collection[int],
    *,
    clip_range: float = 1.0,
    bits: int = 16,
) -> np.ndarray:
    return sum(weights[i] * quantize(updates[i], clip_range=clip_range, bits=bits) for i in sites)


def random_round(n: int, dim: int, seed: int = 0) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    ids = sorted({int(i) for i in rng.integers(0, 2**64, size=n, dtype=np.uint64)})
    assert len(ids) == n
    updates = {i: rng.normal(scale=0.4, size=dim).astype(np.float32) for i in ids}
    weights = {i: int(rng.integers(1, 5000)) for i in ids}
    return make_states(ids), updates, weights


# --- the law: masks cancel -------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=8),
    dim=st.integers(min_value=1, max_value=40),
    data=st.data(),
)
def test_masks_cancel_and_mean_is_within_quantization_bound(
    n: int, dim: int, data: st.DataObject
) -> None:
    """The coordinator recovers exactly sum(w_i q_i) and sum(w_i), and the mean within the bound."""
    # Prepare
    ids = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    threshold = data.draw(st.integers(min_value=n // 2 + 1, max_value=n) | st.just(n))
    threshold = max(threshold, 2)
    bits = data.draw(st.sampled_from([8, 16, 24]))
    element = st.floats(-1.5, 1.5, allow_nan=False, width=32)
    updates = {
        i: np.array(data.draw(st.lists(element, min_size=dim, max_size=dim)), np.float32)
        for i in ids
    }
    weights = {i: data.draw(st.integers(1, 10**6)) for i in ids}
    states = make_states(ids)
    # Execute
    result = run_round(states, updates, weights, threshold=threshold, bits=bits)
    # Assert
    np.testing.assert_array_equal(result.weighted_sum, plain_sum(updates, weights, ids, bits=bits))
    assert result.total_weight == sum(weights.values())
    clipped = {i: np.clip(u.astype(np.float64), -1.0, 1.0) for i, u in updates.items()}
    plain_mean = sum(weights[i] * clipped[i] for i in ids) / sum(weights.values())
    assert np.max(np.abs(result.mean_update - plain_mean)) <= quantization_bound(1.0, bits) * (
        1 + 1e-9
    )


# --- dropouts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage",
    ["before_setup", "after_keys", "after_upload", "after_keys_two_sites"],
    ids=["before-setup", "after-keys", "after-upload", "after-keys-x2"],
)
def test_dropout_is_recovered_exactly(stage: str) -> None:
    # Prepare
    states, updates, weights = random_round(n=6, dim=300, seed=1)
    ids = sorted(states)
    after_keys = {"after_keys": ids[2:3], "after_keys_two_sites": ids[:2]}.get(stage, [])
    after_upload = ids[3:4] if stage == "after_upload" else []
    if stage == "before_setup":
        states.pop(ids[0])
    contributors = [i for i in states if i not in after_keys]
    # Execute
    result = run_round(
        states,
        updates,
        weights,
        threshold=4,
        drop_after_keys=after_keys,
        drop_after_upload=after_upload,
    )
    # Assert
    np.testing.assert_array_equal(result.weighted_sum, plain_sum(updates, weights, contributors))
    assert result.total_weight == sum(weights[i] for i in contributors)
    assert result.dropped == tuple(sorted(after_keys))
    assert set(result.responders) == set(contributors) - set(after_upload)


def test_dropouts_before_and_after_upload_in_one_round_abort() -> None:
    """A pre-upload and a post-upload dropout together leave an unremovable pairwise mask."""
    states, updates, weights = random_round(n=6, dim=50, seed=2)
    ids = sorted(states)
    with pytest.raises(SecAggAbort, match="cannot be unmasked"):
        run_round(
            states,
            updates,
            weights,
            threshold=4,
            drop_after_keys=ids[:1],
            drop_after_upload=ids[1:2],
        )


def test_too_few_uploads_abort_before_anything_is_revealed() -> None:
    # Prepare
    states, updates, weights = random_round(n=5, dim=600, seed=3)
    ids = sorted(states)
    server = new_server(states, threshold=3, dim=600)
    for site in ids[:2]:
        server.receive_upload(upload(states, site, server.config, updates[site], weights[site]))
    # Execute / Assert
    with pytest.raises(SecAggAbort, match="only 2 of 5 sites uploaded"):
        server.unmask_requests()
    held = server.held_vectors()["masked_sum"]
    assert byte_chi2(held) < CHI2_UNIFORM_BYTES_LIMIT
    with pytest.raises(SecAggAbort, match="aborted"):
        server.finalize()


def test_too_few_unmask_replies_abort_and_sum_stays_masked() -> None:
    # Prepare
    states, updates, weights = random_round(n=5, dim=600, seed=4)
    server = new_server(states, threshold=3, dim=600)
    for site in states:
        server.receive_upload(upload(states, site, server.config, updates[site], weights[site]))
    requests = server.unmask_requests()
    for site in sorted(requests)[:2]:
        server.receive_unmask_reply(answer(states, requests[site]))
    # Execute / Assert
    with pytest.raises(SecAggAbort, match="only 2 survivors answered"):
        server.finalize()
    held = server.held_vectors()["masked_sum"]
    assert byte_chi2(held) < CHI2_UNIFORM_BYTES_LIMIT


def test_round_with_fewer_participants_than_threshold_is_refused() -> None:
    states = make_states([1, 2])
    with pytest.raises(SecAggAbort, match="fewer than the threshold 3"):
        new_server(states, threshold=3, dim=4)


# --- the coordinator never holds an individual update ------------------------------------


def _arrays_in(obj: Any, seen: set[int] | None = None) -> list[np.ndarray]:
    """Every numpy array reachable from ``obj``'s attributes, dicts, lists and dataclasses."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        children = list(obj)
    elif dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return []
    return [a for child in children for a in _arrays_in(child, seen)]


def test_server_holds_no_unmasked_individual_update() -> None:
    """After each upload, everything the server holds differs from every plain contribution."""
    # Prepare
    states, updates, weights = random_round(n=4, dim=1024, seed=5)
    server = new_server(states, threshold=3, dim=1024)
    plain = [
        encode_contribution(updates[i], weight=weights[i], clip_range=1.0, bits=16, num_sites=4)
        for i in states
    ]
    for site in states:
        message = upload(states, site, server.config, updates[site], weights[site])
        # What reaches the server looks uniform and matches no plain contribution anywhere.
        assert byte_chi2(message.masked) < CHI2_UNIFORM_BYTES_LIMIT
        # Execute
        server.receive_upload(message)
        # Assert
        held = _arrays_in(server)
        assert [id(a) for a in held] == [id(a) for a in server.held_vectors().values()]
        for vector in held:
            assert byte_chi2(vector) < CHI2_UNIFORM_BYTES_LIMIT
            for contribution in plain:
                assert not np.any(vector == contribution)


def test_plain_contribution_would_fail_the_uniformity_check() -> None:
    """Negative twin of the check above: the statistic does detect an unmasked update."""
    rng = np.random.default_rng(6)
    plain = encode_contribution(
        rng.normal(scale=0.4, size=1024), weight=30, clip_range=1.0, bits=16, num_sites=4
    )
    assert byte_chi2(plain) > 10 * CHI2_UNIFORM_BYTES_LIMIT


# --- freshness and replay --------------------------------------------------------------


def test_same_keys_mask_differently_in_different_rounds() -> None:
    # Prepare
    states, updates, weights = random_round(n=3, dim=256, seed=7)
    site = sorted(states)[0]
    masked = []
    # Execute
    for server_round in (1, 2):
        server = new_server(states, server_round=server_round, threshold=2, dim=256)
        masked.append(upload(states, site, server.config, updates[site], weights[site]).masked)
    # Assert
    assert not np.any(masked[0] == masked[1])


def test_revealed_pairwise_seeds_differ_between_rounds() -> None:
    """A seed revealed for a dropped peer in one round is useless for unmasking another round."""
    # Prepare
    states, updates, weights = random_round(n=3, dim=16, seed=8)
    dropped, survivor = sorted(states)[0], sorted(states)[1]
    revealed = []
    # Execute
    for server_round in (1, 2):
        server = new_server(states, server_round=server_round, threshold=2, dim=16)
        for site in sorted(states)[1:]:
            server.receive_upload(upload(states, site, server.config, updates[site], weights[site]))
        check_consistency(states, server)
        reply = answer(states, server.unmask_requests()[survivor])
        revealed.append(reply.pairwise_seeds[dropped])
    # Assert
    assert revealed[0] != revealed[1]


def test_site_refuses_to_mask_twice_for_a_round() -> None:
    states, updates, weights = random_round(n=3, dim=8, seed=9)
    site = sorted(states)[0]
    server = new_server(states, server_round=5, threshold=2, dim=8)
    upload(states, site, server.config, updates[site], weights[site])
    agent = agent_of(states[site])
    agent.sign_survivors(ConsistencyRequest(site, 5, tuple(sorted(states))))  # committed
    states[site] = agent.to_state()
    for server_round in (5, 4):
        replay = new_server(states, server_round=server_round, threshold=2, dim=8)
        with pytest.raises(SecAggAbort, match="rounds must increase"):
            upload(states, site, replay.config, updates[site], weights[site])


# --- sites refuse a curious coordinator --------------------------------------------------


def _uploaded_round(n: int = 5, threshold: int = 3, seed: int = 10) -> tuple[dict, ServerSecAgg]:
    states, updates, weights = random_round(n=n, dim=16, seed=seed)
    server = new_server(states, threshold=threshold, dim=16)
    for site in states:
        server.receive_upload(upload(states, site, server.config, updates[site], weights[site]))
    return states, server


def test_site_refuses_share_of_a_site_also_listed_as_dropped() -> None:
    # Prepare
    states, server = _uploaded_round()
    site, request = next(iter(server.unmask_requests().items()))
    target = next(i for i in request.survivors if i != site)
    curious = dataclasses.replace(request, dropped=(target,))
    # Execute / Assert
    with pytest.raises(SecAggAbort, match=rf"seed of site\(s\) \[{target}\].*listed as dropped"):
        answer(states, curious)


def test_site_refuses_share_sealed_by_a_dropped_site() -> None:
    """Listing j only as dropped but still forwarding j's sealed share is the same attack."""
    states, server = _uploaded_round()
    site, request = next(iter(server.unmask_requests().items()))
    target = next(i for i in request.survivors if i != site)
    curious = dataclasses.replace(
        request,
        survivors=tuple(i for i in request.survivors if i != target),
        dropped=(target,),
    )
    with pytest.raises(SecAggAbort, match="listed as dropped"):
        answer(states, curious)


def test_site_refuses_when_survivors_are_below_threshold() -> None:
    states, server = _uploaded_round(threshold=3)
    site, request = next(iter(server.unmask_requests().items()))
    others = [i for i in request.survivors if i != site]
    survivors = (site, others[0])
    curious = dataclasses.replace(
        request,
        survivors=survivors,
        dropped=tuple(others[1:]),
        sealed_shares={i: request.sealed_shares[i] for i in survivors},
    )
    with pytest.raises(SecAggAbort, match="below the threshold 3"):
        answer(states, curious)


def test_site_answers_an_unmask_request_only_once() -> None:
    states, server = _uploaded_round()
    site, request = next(iter(server.unmask_requests().items()))
    answer(states, request)
    with pytest.raises(SecAggAbort, match="already answered"):
        answer(states, request)


def test_site_refuses_round_with_substituted_own_key() -> None:
    states, updates, weights = random_round(n=3, dim=8, seed=11)
    site = sorted(states)[0]
    config = new_server(states, threshold=2, dim=8).config
    forged = dict(config.participants)
    forged[site] = SiteSecAgg.create(site).public_keys
    with pytest.raises(SecAggAbort, match="not listed with its own public keys"):
        upload(
            states,
            site,
            dataclasses.replace(config, participants=forged),
            updates[site],
            weights[site],
        )


def test_site_refuses_threshold_of_one() -> None:
    states, updates, weights = random_round(n=3, dim=8, seed=12)
    site = sorted(states)[0]
    config = dataclasses.replace(new_server(states, threshold=2, dim=8).config, threshold=1)
    with pytest.raises(SecAggAbort, match="threshold must be in"):
        upload(states, site, config, updates[site], weights[site])


@pytest.mark.parametrize("swap", [False, True], ids=["tampered", "redirected"])
def test_tampered_or_redirected_sealed_share_aborts(swap: bool) -> None:
    # Prepare
    states, server = _uploaded_round()
    requests = server.unmask_requests()
    site_a, site_b = sorted(requests)[:2]
    sealed = dict(requests[site_a].sealed_shares)
    if swap:  # hand site_a the share that site_b's seed owner sealed for site_b
        sealed[site_b] = requests[site_b].sealed_shares[site_b]
    else:
        raw = bytearray(sealed[site_b])
        raw[20] ^= 0xFF
        sealed[site_b] = bytes(raw)
    # Execute / Assert
    with pytest.raises(SecAggAbort, match="failed authentication"):
        answer(states, dataclasses.replace(requests[site_a], sealed_shares=sealed))


# --- the coordinator detects bad answers -------------------------------------------------


def test_corrupted_seed_share_is_detected_by_the_commitment() -> None:
    states, server = _uploaded_round(threshold=5)
    requests = server.unmask_requests()
    for i, (_site, request) in enumerate(sorted(requests.items())):
        reply = answer(states, request)
        if i == 0:
            shares = dict(reply.seed_shares)
            owner = next(iter(shares))
            raw = bytearray(shares[owner])
            raw[-1] ^= 0x01
            shares[owner] = bytes(raw)
            reply = dataclasses.replace(reply, seed_shares=shares)
        server.receive_unmask_reply(reply)
    with pytest.raises(SecAggAbort, match="does not match its commitment"):
        server.finalize()


def test_wrong_pairwise_seed_is_detected_by_the_range_check() -> None:
    states, updates, weights = random_round(n=4, dim=64, seed=13)
    ids = sorted(states)
    server = new_server(states, threshold=3, dim=64)
    for site in ids[1:]:
        server.receive_upload(upload(states, site, server.config, updates[site], weights[site]))
    check_consistency(states, server)
    for i, (_site, request) in enumerate(sorted(server.unmask_requests().items())):
        reply = answer(states, request)
        if i == 0:
            reply = dataclasses.replace(reply, pairwise_seeds={ids[0]: bytes(32)})
        server.receive_unmask_reply(reply)
    with pytest.raises(SecAggAbort, match="out of range"):
        server.finalize()


@pytest.mark.parametrize(
    "change",
    [
        {"server_round": 9},
        {"masked": np.zeros(3, np.uint64)},
        {"sealed_shares": {}},
    ],
    ids=["other-round", "wrong-length", "missing-shares"],
)
def test_malformed_upload_is_rejected_and_leaves_the_round_unchanged(
    change: dict[str, Any],
) -> None:
    states, updates, weights = random_round(n=3, dim=8, seed=14)
    site = sorted(states)[0]
    server = new_server(states, threshold=2, dim=8)
    message = upload(states, site, server.config, updates[site], weights[site])
    with pytest.raises(SecAggAbort):
        server.receive_upload(dataclasses.replace(message, **change))
    assert server.uploaded == ()
    assert not server.held_vectors()["masked_sum"].any()


def test_duplicate_upload_is_rejected() -> None:
    states, updates, weights = random_round(n=3, dim=8, seed=15)
    site = sorted(states)[0]
    server = new_server(states, threshold=2, dim=8)
    message = upload(states, site, server.config, updates[site], weights[site])
    server.receive_upload(message)
    with pytest.raises(SecAggAbort, match="uploaded twice"):
        server.receive_upload(message)


# --- wire and state contract --------------------------------------------------------------


def _assert_plain_wire(values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, list):
            assert all(type(v) in (int, bytes) for v in value), key
        else:
            assert type(value) in (int, float, str, bytes, np.ndarray), key


def test_every_message_and_the_site_state_are_plain_values() -> None:
    # Prepare
    states, updates, weights = random_round(n=3, dim=8, seed=16)
    site = sorted(states)[0]
    server = new_server(states, threshold=2, dim=8)
    agent = SiteSecAgg.from_state(states[site])
    # Execute
    setup = agent.setup_reply()
    masked = agent.mask_update(server.config, updates[site], weight=weights[site])
    # Assert
    for message in (setup, server.config, masked):
        _assert_plain_wire(message.to_wire())
        assert wire(message).to_wire().keys() == message.to_wire().keys()
    _assert_plain_wire(agent.to_state())
    assert SiteSecAgg.from_state(agent.to_state()).pending == server.config
    assert SetupReply.from_wire(setup.to_wire()) == setup


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("site_id", -1, "unsigned 64-bit"),
        ("enc_key", b"short", "length 32"),
        ("mask_key", None, "must be bytes"),
    ],
    ids=["negative-id", "short-key", "missing-key"],
)
def test_malformed_wire_names_message_and_key(key: str, value: Any, message: str) -> None:
    wire_dict = SiteSecAgg.create(1).setup_reply().to_wire()
    wire_dict[key] = value
    with pytest.raises(SecAggAbort, match=rf"SetupReply: key '{key}' .*{message}"):
        SetupReply.from_wire(wire_dict)


def test_rekeyed_site_joins_the_next_round() -> None:
    states, updates, weights = random_round(n=3, dim=32, seed=17)
    run_round(states, updates, weights, threshold=2, drop_after_keys=sorted(states)[:1])
    site = sorted(states)[0]
    agent = SiteSecAgg.from_state(states[site])
    agent.rekey()
    states[site] = agent.to_state()
    result = run_round(states, updates, weights, threshold=3, server_round=2)
    np.testing.assert_array_equal(result.weighted_sum, plain_sum(updates, weights, states))


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "num_sites", "expected"),
    [(0.6, 10, 6), (0.6, 5, 3), (0.1, 5, 2), (1.0, 4, 4), (3, 10, 3)],
    ids=["fraction", "fraction-rounds-up", "at-least-two", "all", "absolute"],
)
def test_resolve_threshold(threshold: float, num_sites: int, expected: int) -> None:
    assert resolve_threshold(threshold, num_sites=num_sites) == expected


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"bits": 1}, "secagg.bits"),
        ({"clip_range": 0.0}, "secagg.clip_range"),
        ({"threshold": 1}, "secagg.threshold"),
    ],
    ids=["bits", "clip-range", "threshold"],
)
def test_server_settings_errors_name_the_config_key(kwargs: dict[str, Any], key: str) -> None:
    states = make_states([1, 2, 3])
    settings_ = {"threshold": 2, "dim": 4, "clip_range": 1.0, "bits": 16} | kwargs
    with pytest.raises(ConfigError, match=key):
        ServerSecAgg(run_id=1, server_round=1, participants=directory(states), **settings_)
