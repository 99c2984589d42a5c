"""Ray Serve application: restyle text over HTTP with named or per-sentence merged adapters.

`twist serve --config FILE` calls `serve_main`; `serve deploy cluster/serve.yaml` imports
`ray_twist.serve:app_builder`. See `app` (deployments), `api` (the HTTP contract),
`engine` (batched restyling without Ray) and `config` (the config model).
"""

from ray_twist.serve.api import RestyleRequest, RestyleResponse
from ray_twist.serve.app import app_builder, build_app, run, serve_main
from ray_twist.serve.config import ServeConfig

__all__ = [
    "RestyleRequest",
    "RestyleResponse",
    "ServeConfig",
    "app_builder",
    "build_app",
    "run",
    "serve_main",
]
