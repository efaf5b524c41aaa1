"""Secure aggregation: the coordinator learns only the sum of the surviving sites' updates.

Pure protocol modules, with no Flower import (the Flower adapters live beside them):

- :mod:`~fedinfer.secagg.keys`      X25519 key pairs, key agreement, HKDF derivations
- :mod:`~fedinfer.secagg.seal`      ChaCha20-Poly1305 sealing of Shamir shares
- :mod:`~fedinfer.secagg.prg`       AES-256-CTR expansion of seeds into uint64 masks
- :mod:`~fedinfer.secagg.shamir`    Shamir secret sharing over GF(2**521 - 1)
- :mod:`~fedinfer.secagg.quantize`  fixed-point encoding of weighted updates, error bound
- :mod:`~fedinfer.secagg.layout`    flatten / unflatten named arrays in a stable order
- :mod:`~fedinfer.secagg.messages`  protocol messages and their wire form
- :mod:`~fedinfer.secagg.site`      :class:`SiteSecAgg`, the site's steps
- :mod:`~fedinfer.secagg.server`    :class:`ServerSecAgg`, the coordinator's steps for one round
- :mod:`~fedinfer.secagg.store`     the site's per-run state file (keys, replay guard)

One round after the per-run key set-up costs one extra exchange beyond FedAvg when every
participant uploads, two when one dropped before uploading::

    set-up       server <- SetupReply            (each site, once per run)
    exchange 1   server -> RoundConfig            (with the train message)
                 server <- MaskedUpload           (with the train reply; signs the full list)
    consistency  server -> ConsistencyRequest     (only if a participant dropped)
                 server <- ConsistencyReply       (the survivor's signature of the list)
    exchange 2   server -> UnmaskRequest          (to each signer, with all the signatures)
                 server <- UnmaskReply
"""

from fedinfer.secagg.keys import PublicKeys, SiteKeys
from fedinfer.secagg.layout import VectorLayout, flatten_arrays, unflatten_vector
from fedinfer.secagg.messages import (
    ConsistencyReply,
    ConsistencyRequest,
    MaskedUpload,
    RoundConfig,
    SetupReply,
    UnmaskReply,
    UnmaskRequest,
    WireValue,
)
from fedinfer.secagg.quantize import quantization_bound, quantize
from fedinfer.secagg.server import AggregateResult, ServerSecAgg, resolve_threshold
from fedinfer.secagg.site import SiteSecAgg

__all__ = [
    "AggregateResult",
    "ConsistencyReply",
    "ConsistencyRequest",
    "MaskedUpload",
    "PublicKeys",
    "RoundConfig",
    "ServerSecAgg",
    "SetupReply",
    "SiteKeys",
    "SiteSecAgg",
    "UnmaskReply",
    "UnmaskRequest",
    "VectorLayout",
    "WireValue",
    "flatten_arrays",
    "quantization_bound",
    "quantize",
    "resolve_threshold",
    "unflatten_vector",
]
