"""The breast-cancer data set and the scikit-learn models that model servers serve.

Start-up cost, measured on a 2-core container (Python 3.11, scikit-learn 1.9.1):
importing scikit-learn takes ~0.7 s, loading and splitting the data ~0.01 s, fitting
logreg-v1 ~0.005 s and gboost-v2 ~0.2 s, so a server is up in about a second. That is
well under the 2 s at which caching fitted models on disk would pay for its staleness
and pickle-compatibility problems, so models are trained once per process and kept in
memory only.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "FAMILY",
    "FEATURE_COUNT",
    "MODELS",
    "FittedModel",
    "ModelSpec",
    "fitted_model",
    "heldout",
]

FAMILY = "breast-cancer"
"""The family name every model here answers to, besides its own name."""

FEATURE_COUNT = 30
"""Features per row: the 30 measurements of scikit-learn's breast-cancer data set."""

CLASS_NAMES: tuple[str, ...] = ("malignant", "benign")
"""Label i means CLASS_NAMES[i], in scikit-learn's `load_breast_cancer().target_names` order."""

# scikit-learn is imported inside the functions below, not here: it costs ~0.7 s, and
# `model-server --help` or a bad flag should answer at once.


@dataclass(frozen=True)
class ModelSpec:
    """One servable model: what it is called, its version, and how to build it."""

    name: str
    """The model's own name, accepted in PredictRequest.model_name."""
    version: str
    """The version reported in every reply and accepted in PredictRequest.model_version."""
    role: str
    """Its part in a shadow rollout: "production" or "candidate"."""
    kind: str
    """A one-line description of the estimator, shown in `--help` and logs."""
    build: Callable[[], Any]
    """Returns a new, unfitted scikit-learn classifier."""


def _build_logreg() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Scaling first lets lbfgs converge well within its default iterations.
    return make_pipeline(StandardScaler(), LogisticRegression())


def _build_gboost() -> Any:
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(random_state=0)


MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ModelSpec(
                name="logreg-v1",
                version="1",
                role="production",
                kind="StandardScaler + LogisticRegression",
                build=_build_logreg,
            ),
            ModelSpec(
                name="gboost-v2",
                version="2",
                role="candidate",
                kind="GradientBoostingClassifier(random_state=0)",
                build=_build_gboost,
            ),
        )
    }
)
"""Every model a server can serve, by name."""


@dataclass(frozen=True)
class FittedModel:
    """A model trained on the training split, ready to predict."""

    spec: ModelSpec
    estimator: Any

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64, shape [n]) and class probabilities (float32, shape [n, 2]).

        `features` is a finite float array of shape [n, FEATURE_COUNT].
        """
        probabilities = np.asarray(
            self.estimator.predict_proba(features.astype(np.float64, copy=False)),
            dtype=np.float64,
        )
        # The label is the most probable class, so label and probabilities never disagree.
        labels = np.asarray(self.estimator.classes_)[probabilities.argmax(axis=1)]
        return labels.astype(np.int64), probabilities.astype(np.float32)


def heldout() -> tuple[np.ndarray, np.ndarray]:
    """The held-out test split: features (float64, [171, 30]) and labels (int64, [171]).

    No model saw these rows in training. Copies, so callers may change them freely.
    """
    _, x_test, _, y_test = _split()
    return x_test.copy(), y_test.copy()


_lock = threading.Lock()
_fitted: dict[str, FittedModel] = {}


def fitted_model(name: str) -> FittedModel:
    """The model `name` from MODELS, trained on first use and then kept for the process.

    Thread-safe; raises KeyError for an unknown name.
    """
    spec = MODELS[name]
    with _lock:
        # Held while training so that concurrent callers train each model only once.
        model = _fitted.get(name)
        if model is None:
            x_train, _, y_train, _ = _split()
            model = FittedModel(spec=spec, estimator=spec.build().fit(x_train, y_train))
            _fitted[name] = model
        return model


# Unlocked: two threads racing here both compute the same deterministic split, harmlessly.
@functools.cache
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """X_train, X_test, y_train, y_test: a fixed, stratified 70/30 split."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float64), y.astype(np.int64), test_size=0.3, random_state=42, stratify=y
    )
    return x_train, x_test, y_train, y_test
