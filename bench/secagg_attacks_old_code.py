"""Both issue-11 item-4 attacks, written against the code BEFORE the fix (run with PYTHONPATH at a
commit before branch secagg, e.g. ff49e69): each recovers one site's exact contribution.

The same attacks against the current code are tests/test_secagg_attacks.py (refused there).
"""

import numpy as np
from fedinfer.secagg import ServerSecAgg, SiteSecAgg, UnmaskRequest, resolve_threshold
from fedinfer.secagg.keys import KEY_BYTES
from fedinfer.secagg.prg import PAIRWISE_MASK, SELF_MASK, MaskExpander
from fedinfer.secagg.quantize import encode_contribution
from fedinfer.secagg.shamir import Share, reconstruct_secret

DIM, RUN = 32, 42
rng = np.random.default_rng(4)
ids = sorted(int(i) for i in rng.choice(2**40, size=5, replace=False))
updates = {i: rng.normal(scale=0.3, size=DIM).astype(np.float32) for i in ids}
weights = {i: int(rng.integers(10, 500)) for i in ids}
truth = {
    i: encode_contribution(
        updates[i], weight=weights[i], clip_range=1.0, bits=16, num_sites=5
    ).view(np.int64)
    for i in ids
}

def new_server(sites, rnd, parts):
    return ServerSecAgg(
        run_id=RUN,
        server_round=rnd,
        participants={i: sites[i].public_keys for i in parts},
        threshold=resolve_threshold(0.6, num_sites=len(parts)),
        dim=DIM,
        clip_range=1.0,
        bits=16,
    )

# --- split view ---
sites = {i: SiteSecAgg.create(i) for i in ids}
server = new_server(sites, 1, ids)
uploads = {
    i: sites[i].mask_update(server.config, updates[i], weight=weights[i]) for i in ids
}
x, a, b, c, d = ids
views = {x: (x, a, b), a: (a, b, c, d), b: (a, b, c, d), c: (c, d, x), d: (c, d, x)}
replies = {}
for s, surv in views.items():
    req = UnmaskRequest(
        site_id=s,
        server_round=1,
        survivors=tuple(sorted(surv)),
        dropped=tuple(i for i in ids if i not in surv),
        sealed_shares={o: uploads[o].sealed_shares[s] for o in surv},
    )
    replies[s] = sites[s].unmask(req)
holders = [s for s in ids if x in replies[s].seed_shares]
b_x = reconstruct_secret(
    [Share.from_bytes(replies[h].seed_shares[x]) for h in holders[:3]], length=KEY_BYTES
)
pair = {}
for s, r in replies.items():
    for peer, seed in r.pairwise_seeds.items():
        if x in (s, peer):
            pair[peer if s == x else s] = seed
assert set(pair) == set(ids) - {x}, pair.keys()
vec = uploads[x].masked.copy()
ex = MaskExpander(DIM + 1)
ex.add_into(vec, b_x, purpose=SELF_MASK, subtract=True)
for peer, seed in pair.items():
    ex.add_into(vec, seed, purpose=PAIRWISE_MASK, subtract=peer > x)
print("split view: target's upload unmasked exactly:", np.array_equal(vec.view(np.int64), truth[x]))

# --- replayed round after a resumed set-up ---
def full_round(sites, rnd, parts):
    srv = new_server(sites, rnd, parts)
    for i in parts:
        srv.receive_upload(sites[i].mask_update(srv.config, updates[i], weight=weights[i]))
    for s, req in srv.unmask_requests().items():
        srv.receive_unmask_reply(sites[s].unmask(req))
    return srv.finalize().weighted_sum
sites = {i: SiteSecAgg.create(i) for i in ids}
s1 = full_round(sites, 1, ids)
sites = {i: SiteSecAgg.create(i) for i in ids}  # resumed run: secagg_setup resets the state
target = ids[2]
s2 = full_round(sites, 1, [i for i in ids if i != target])
diff = s1 - s2
print(
    "replayed round: target's weighted update recovered exactly:",
    np.array_equal(diff, truth[target][:-1]),
)
