"""The style classifier behind style accuracy: logistic regression on frozen featurizer embeddings.

Trained on a dataset's style-labelled texts; a stratified slice is held out and the model's
accuracy on it is reported with every evaluation, so a reader knows how far to trust ACC
(a 60 %-accurate judge cannot certify 95 % style accuracy). The fitted model is a few
numbers (classes, coefficients, intercepts) kept as JSON — no pickles — and applied with
numpy; scikit-learn is only needed to fit.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ray_twist import storage
from ray_twist.features import DEFAULT_FEATURIZER, Featurizer


@functools.lru_cache(maxsize=2)
def shared_featurizer(model: str) -> Featurizer:
    """One featurizer per model id and process: study workers score many adapters."""
    return Featurizer(model)


@dataclass
class StyleClassifier:
    """A fitted linear style classifier over `featurizer` embeddings."""

    classes: list[str]
    coef: list[list[float]]
    intercept: list[float]
    featurizer: str
    heldout_accuracy: float
    n_train: int
    n_heldout: int

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[str],
        featurizer: str = DEFAULT_FEATURIZER,
        heldout_fraction: float = 0.2,
        seed: int = 0,
    ) -> StyleClassifier:
        """Fit on all but a stratified `heldout_fraction`, which measures held-out accuracy."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"a style classifier needs ≥2 labels, got {classes}")
        held = max(len(classes), round(heldout_fraction * len(texts)))  # ≥1 text per class
        if len(texts) - held < len(classes):
            raise ValueError(
                f"{len(texts)} labelled texts are too few to fit and test {len(classes)} styles"
            )
        x = shared_featurizer(featurizer).encode(list(texts))
        y = np.asarray(labels)
        x_fit, x_held, y_fit, y_held = train_test_split(
            x, y, test_size=held, random_state=seed, stratify=y
        )
        model = LogisticRegression(max_iter=2000, C=10.0).fit(x_fit, y_fit)
        fitted = cls(
            classes=[str(c) for c in model.classes_],
            coef=model.coef_.tolist(),
            intercept=model.intercept_.tolist(),
            featurizer=featurizer,
            heldout_accuracy=0.0,
            n_train=len(y_fit),
            n_heldout=len(y_held),
        )
        fitted.heldout_accuracy = 100.0 * float(
            np.mean(fitted.predict_embeddings(x_held) == y_held)
        )
        return fitted

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, classes) probabilities, as scikit-learn's predict_proba computes them."""
        z = embeddings @ np.asarray(self.coef).T + np.asarray(self.intercept)
        if len(self.classes) == 2:  # binary: one logit for classes[1]
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes)[self.probabilities(embeddings).argmax(axis=1)]

    def judge(self, texts: Sequence[str], style: str) -> tuple[list[str], list[float]]:
        """(predicted label, probability of `style`) per text."""
        if style not in self.classes:
            raise ValueError(
                f"style {style!r} is not a class of the style classifier ({', '.join(self.classes)})"
            )
        probs = self.probabilities(shared_featurizer(self.featurizer).encode(list(texts)))
        predicted = np.asarray(self.classes)[probs.argmax(axis=1)]
        return predicted.tolist(), probs[:, self.classes.index(style)].tolist()

    def save(self, uri: str) -> str:
        storage.write_bytes(uri, json.dumps(asdict(self)).encode())
        return uri

    @classmethod
    def load(cls, uri: str) -> StyleClassifier:
        return cls(**json.loads(storage.read_bytes(uri)))
