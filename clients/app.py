"""A site's Flower ClientApp (``[tool.flwr.app.components] clientapp``).

Thin entry point: a forwarder that imports only Flower and hands every message to the site's
long-lived worker (:mod:`fedinfer.deploy.forwarder`), which runs :mod:`fedinfer.fl.client_app`.
Start a site with ``fedinfer site`` (see docs/deployment.md).
"""

from fedinfer.deploy.forwarder import build_forwarder_app

app = build_forwarder_app()
