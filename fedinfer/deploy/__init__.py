"""Real deployments: certificates and keys, the coordinator and site launchers, status.

The pieces, one module each: :mod:`~fedinfer.deploy.certs` (private CA, TLS
certificate, node keys, signing key), :mod:`~fedinfer.deploy.flower` (Flower's
SuperLink / SuperNode / ``flwr`` commands), :mod:`~fedinfer.deploy.gateway`
(the public Fleet-API-only proxy), :mod:`~fedinfer.deploy.coordinator` and
:mod:`~fedinfer.deploy.site` (the supervised launchers),
:mod:`~fedinfer.deploy.apps` (the ServerApp and ClientApp that ``server/`` and
``clients/`` export), :mod:`~fedinfer.deploy.local` (everything on one machine)
and :mod:`~fedinfer.deploy.status`.
"""
