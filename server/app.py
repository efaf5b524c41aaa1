"""The coordinator's Flower ServerApp (``[tool.flwr.app.components] serverapp``).

Thin entry point: the logic lives in :mod:`fedinfer.deploy.apps` and :mod:`fedinfer.fl`.
Start a federation with ``fedinfer coordinator`` (see docs/deployment.md).
"""

from fedinfer.deploy.apps import build_deploy_server_app

app = build_deploy_server_app()
