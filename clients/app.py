"""A site's Flower ClientApp (``[tool.flwr.app.components] clientapp``).

Thin entry point: the logic lives in :mod:`fedinfer.fl.client_app` and :mod:`fedinfer.fl.site`.
Start a site with ``fedinfer site`` (see docs/deployment.md).
"""

from fedinfer.deploy.apps import build_deploy_client_app

app = build_deploy_client_app()
