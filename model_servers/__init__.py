"""Real scikit-learn model servers for the shadow proxy's tests and demo.

Each serves one model over predict.v1 (the project's own protocol) or, with
``protocol="v2"`` (``--protocol v2``), over the Open Inference Protocol (KServe v2, as
Triton serves it).
"""

from model_servers.models import CLASS_NAMES, FAMILY, FEATURE_COUNT, MODELS, ModelSpec, heldout
from model_servers.server import (
    BindError,
    ModelServerOptions,
    ReceivedCall,
    RunningModelServer,
    start_model_server,
)

__all__ = [
    "CLASS_NAMES",
    "FAMILY",
    "FEATURE_COUNT",
    "MODELS",
    "BindError",
    "ModelServerOptions",
    "ModelSpec",
    "ReceivedCall",
    "RunningModelServer",
    "heldout",
    "start_model_server",
]
