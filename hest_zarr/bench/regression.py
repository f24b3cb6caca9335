"""Regressors and metric of the HEST-Benchmark (protocol ``hest-bench-1.0``, see :mod:`~hest_zarr.bench.protocol`).

- ``pca_ridge``: (standardise, per the preset) PCA to 256 components fit on the training fold, then Ridge with
  L2 coefficient ``100 / (M * C)``, ``M`` = 256 (the features entering the Ridge), ``C`` = number of genes.
- ``ridge``: Ridge on the raw embeddings, same coefficient with ``M`` = embedding dimension.
- ``xgboost``: one multi-output ``XGBRegressor`` (``hist`` trees, one output per tree) with the paper's
  parameters (100 estimators, learning rate 0.1, depth 3, subsample 0.8, gamma 0, alpha 0, lambda 1) plus the
  preset's extras, on the raw embeddings or (preset ``xgboost_on_pca``) on the same PCA features as ``pca_ridge``.

The metric is Pearson's r between predicted and measured ``log1p`` expression, per gene on the test fold; a
gene whose measured or predicted values are constant on the fold has no r (NaN, counted and left out of the
mean). A fold scores the mean over genes; a task the mean and standard deviation (``ddof=0``) over folds.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.stats

from hest_zarr.bench.protocol import (
    DEFAULT_PRESET,
    DEFAULT_SEED,
    PCA_COMPONENTS,
    PRESETS,
    REGRESSORS,
    RIDGE_ALPHA_NUMERATOR,
    XGBOOST_PARAMETERS,
    Preprocessing,
    RegressorName,
)
from hest_zarr.bench.tasks import Fold
from hest_zarr.errors import InputError

#: Standardised test values beyond this many training standard deviations are warned about (a Gaussian feature
#: passes 6 once in 500 million draws).
OUT_OF_RANGE_Z = 100.0


class FeatureRangeWarning(UserWarning):
    """The standardised test fold has features far outside the training fold's range."""


def ridge_alpha(n_features: int, n_targets: int) -> float:
    """Ridge's L2 coefficient ``100 / (M * C)`` for ``M`` features and ``C`` targets.

    Examples
    --------
    >>> ridge_alpha(256, 50)
    0.0078125

    """
    return RIDGE_ALPHA_NUMERATOR / (n_features * n_targets)


def pearson_per_gene(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson's r of every column (gene) of two ``(spots, genes)`` arrays; NaN where a column is constant.

    Examples
    --------
    >>> pearson_per_gene(np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]), np.array([[2.0, 0.0], [4.0, 1.0], [7.0, 2.0]]))
    array([0.99339927,        nan])

    """
    measured = np.asarray(measured, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if measured.shape != predicted.shape or measured.ndim != 2:
        raise InputError(f"measured {measured.shape} and predicted {predicted.shape} must be equal (spots, genes)")
    if len(measured) < 2:  # one spot: every column is constant
        return np.full(measured.shape[1], np.nan)
    with warnings.catch_warnings():  # a constant column is expected (no r), not worth a warning
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        return np.asarray(scipy.stats.pearsonr(measured, predicted, axis=0).statistic, dtype=np.float64)


@dataclass
class Prediction:
    """Test-fold predictions of one regressor and what it used (coefficient, components, ...)."""

    values: np.ndarray
    details: dict[str, Any]


def _pca_features(
    x_train: np.ndarray, x_test: np.ndarray, options: Preprocessing, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Standardise (per the preset) and project on the training fold's first 256 principal components."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    details: dict[str, Any] = {}
    if options.standardize_before_pca:
        scaler = StandardScaler().fit(x_train)
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
        _check_test_range(x_test, details)
    n_components = min(PCA_COMPONENTS, *x_train.shape)
    pca = PCA(n_components=n_components, svd_solver=options.pca_svd_solver, random_state=seed).fit(x_train)
    details.update(n_components=n_components, explained_variance=float(pca.explained_variance_ratio_.sum()))
    return pca.transform(x_train), pca.transform(x_test), details


def _check_test_range(z_test: np.ndarray, details: dict[str, Any]) -> None:
    """Record how far the standardised test fold reaches, and warn when a feature lies far outside the training one.

    A feature (nearly) constant on the training fold has a tiny standard deviation; where the test fold uses it,
    standardising puts it hundreds of deviations out and it can dominate the principal components' test scores.
    """
    reach = np.abs(z_test).max(axis=0)
    feature = int(np.argmax(reach))
    furthest = float(reach[feature])
    details.update(max_abs_test_z=round(furthest, 1), max_abs_test_z_feature=feature)
    if furthest > OUT_OF_RANGE_Z:
        warnings.warn(
            f"standardised test features reach {furthest:.0f} training standard deviations (feature {feature}, "
            f"{int((reach > OUT_OF_RANGE_Z).sum())} feature(s) beyond {OUT_OF_RANGE_Z:g}): features nearly constant "
            "on the training fold can dominate the PCA + Ridge predictions of this fold",
            FeatureRangeWarning,
            stacklevel=3,
        )


def _ridge(n_features: int, n_targets: int, preprocessing: Preprocessing, seed: int):
    from sklearn.linear_model import Ridge

    alpha = ridge_alpha(n_features, n_targets)
    model = Ridge(
        alpha=alpha,
        fit_intercept=preprocessing.fit_intercept,
        solver=preprocessing.ridge_solver,
        max_iter=preprocessing.ridge_max_iter,
        tol=preprocessing.ridge_tol,
        random_state=seed,
    )
    return model, alpha


def fit_predict(
    regressor: RegressorName | str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    preprocessing: Preprocessing | str = DEFAULT_PRESET,
    seed: int = DEFAULT_SEED,
    n_jobs: int | None = None,
) -> Prediction:
    """Fit a regressor on the training fold and predict the test fold.

    Parameters
    ----------
    regressor
        ``"pca_ridge"``, ``"ridge"`` or ``"xgboost"``.
    x_train, y_train, x_test
        Embeddings ``(n, M)`` and targets ``(n, C)``.
    preprocessing
        A :class:`~hest_zarr.bench.protocol.Preprocessing` or preset name (``"hest-code"``, ``"paper"``).
    seed
        Random state of PCA, Ridge and XGBoost.
    n_jobs
        XGBoost threads (default: all cores).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.normal(size=(300, 20)), rng.normal(size=(20, 3))
    >>> prediction = fit_predict("ridge", x[:200], x[:200] @ w, x[200:])
    >>> prediction.details["alpha"], bool(pearson_per_gene(x[200:] @ w, prediction.values).min() > 0.999)
    (1.6666666666666667, True)

    """
    if isinstance(preprocessing, str) and preprocessing not in PRESETS:
        raise InputError(f"unknown preprocessing {preprocessing!r}; expected one of {sorted(PRESETS)}")
    options = PRESETS[preprocessing] if isinstance(preprocessing, str) else preprocessing
    x_train, x_test = np.asarray(x_train, dtype=np.float64), np.asarray(x_test, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.float64)
    if len(x_train) != len(y_train) or x_train.shape[1] != x_test.shape[1]:
        raise InputError(f"x_train {x_train.shape}, y_train {y_train.shape} and x_test {x_test.shape} do not line up")
    n_targets = y_train.shape[1]
    if regressor not in REGRESSORS:
        raise InputError(f"unknown regressor {regressor!r}; expected one of {REGRESSORS}")
    details: dict[str, Any] = {}
    if regressor == "pca_ridge" or (regressor == "xgboost" and options.xgboost_on_pca):
        x_train, x_test, details = _pca_features(x_train, x_test, options, seed)
    if regressor == "xgboost":
        import xgboost

        parameters = {**XGBOOST_PARAMETERS, **options.xgboost_extra}
        model = xgboost.XGBRegressor(**parameters, tree_method="hist", random_state=seed, n_jobs=n_jobs)
        values = model.fit(x_train, y_train).predict(x_test)
        details["parameters"] = parameters
    else:
        ridge, alpha = _ridge(x_train.shape[1], n_targets, options, seed)
        values = ridge.fit(x_train, y_train).predict(x_test)
        details.update(alpha=alpha, n_features=x_train.shape[1])
    return Prediction(np.asarray(values, dtype=np.float64).reshape(len(x_test), n_targets), details)


@dataclass
class FoldResult:
    """Scores of one fold: Pearson's r per gene and what the regressor used."""

    fold: int
    train: list[str]
    test: list[str]
    n_train: int
    n_test: int
    pearson: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean r over genes with a defined r (NaN when none)."""
        defined = self.pearson[np.isfinite(self.pearson)]
        return float(defined.mean()) if len(defined) else float("nan")

    @property
    def n_undefined(self) -> int:
        """Genes without a defined r on this fold (constant measured or predicted values)."""
        return int((~np.isfinite(self.pearson)).sum())


@dataclass
class RegressionResult:
    """One (task, encoder, regressor): every fold's scores, their mean and standard deviation."""

    task: str
    encoder: str
    regressor: str
    genes: list[str]
    folds: list[FoldResult]

    @property
    def mean(self) -> float:
        """Mean over folds of the fold scores."""
        return float(np.mean([fold.mean for fold in self.folds]))

    @property
    def std(self) -> float:
        """Standard deviation (``ddof=0``) over folds of the fold scores."""
        return float(np.std([fold.mean for fold in self.folds]))


def evaluate(
    regressor: RegressorName | str,
    embeddings: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray],
    folds: Sequence[Fold],
    genes: Sequence[str],
    *,
    task: str = "task",
    encoder: str = "encoder",
    preprocessing: Preprocessing | str = DEFAULT_PRESET,
    seed: int = DEFAULT_SEED,
    n_jobs: int | None = None,
) -> RegressionResult:
    """Run one regressor over a task's folds: train on the training samples' spots, score on the test samples'.

    Parameters
    ----------
    regressor
        ``"pca_ridge"``, ``"ridge"`` or ``"xgboost"``.
    embeddings, targets
        Sample id -> ``(spots, M)`` embeddings and ``(spots, C)`` log1p targets, rows matching.
    folds
        The task's folds.
    genes
        Gene names of the target columns.
    task, encoder
        Names recorded in the result.
    preprocessing, seed, n_jobs
        See :func:`fit_predict`.

    """
    results = []
    for number, fold in enumerate(folds):
        x_train = np.concatenate([embeddings[sample] for sample in fold.train])
        y_train = np.concatenate([targets[sample] for sample in fold.train])
        x_test = np.concatenate([embeddings[sample] for sample in fold.test])
        y_test = np.concatenate([targets[sample] for sample in fold.test])
        prediction = fit_predict(
            regressor, x_train, y_train, x_test, preprocessing=preprocessing, seed=seed, n_jobs=n_jobs
        )
        results.append(
            FoldResult(
                fold=number,
                train=list(fold.train),
                test=list(fold.test),
                n_train=len(x_train),
                n_test=len(x_test),
                pearson=pearson_per_gene(y_test, prediction.values),
                details=prediction.details,
            )
        )
    return RegressionResult(task, encoder, regressor, list(genes), results)
