"""The app's Flower ClientApp (``[tool.flwr.app.components] clientapp``).

Flower requires an app to name a ClientApp, so this file exists; fedinfer sites never run it.
``fedinfer site`` runs its own, locally installed ClientApp in its site worker
(:mod:`fedinfer.deploy.site_worker`) and never installs or imports the app bundle a coordinator
ships: a coordinator cannot run code at a site. This is the same ClientApp, for Flower tools
that load an app from this directory.
"""

from fedinfer.deploy.apps import build_deploy_client_app

app = build_deploy_client_app()
