"""Real scikit-learn model servers speaking predict.v1, for the shadow proxy's tests and demo."""

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
