"""Regressors and metric against independent computations (synthetic embeddings and targets made here).

Ridge is checked against its closed form solved with numpy, PCA against numpy's SVD, XGBoost against a direct
``XGBRegressor`` call with the protocol's parameters, Pearson per gene against ``numpy.corrcoef``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hest_zarr.bench.protocol import PRESETS, XGBOOST_PARAMETERS
from hest_zarr.bench.regression import (
    FeatureRangeWarning,
    FoldResult,
    evaluate,
    fit_predict,
    pearson_per_gene,
    ridge_alpha,
)
from hest_zarr.bench.tasks import Fold
from hest_zarr.errors import InputError


def synthetic(n_train: int, n_test: int, n_features: int, n_targets: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_test, n_features)) * rng.uniform(0.1, 3, n_features) + rng.normal(size=n_features)
    y = np.log1p(np.abs(x @ rng.normal(size=(n_features, n_targets)) + rng.normal(size=(n_train + n_test, n_targets))))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def assert_same_predictions(got: np.ndarray, expected: np.ndarray, preset: str) -> None:
    """Cholesky ("paper") solves exactly; LSQR ("hest-code", tol 1e-4) stops within a few 1e-3 of the solution."""
    relative = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert relative < (5e-3 if PRESETS[preset].ridge_solver == "lsqr" else 1e-10)


def closed_form_ridge(x: np.ndarray, y: np.ndarray, alpha: float, intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ||y - b - x w||^2 + alpha ||w||^2 exactly (intercept unpenalised, by centring)."""
    x_mean, y_mean = (x.mean(axis=0), y.mean(axis=0)) if intercept else (np.zeros(x.shape[1]), np.zeros(y.shape[1]))
    xc, yc = x - x_mean, y - y_mean
    weights = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return weights, y_mean - x_mean @ weights


def test_ridge_coefficient_is_100_over_m_times_c() -> None:
    assert ridge_alpha(1280, 50) == 100 / 64000
    assert ridge_alpha(256, 50) == pytest.approx(0.0078125, rel=0, abs=0)
    assert ridge_alpha(1024, 50) == 100 / (1024 * 50)


@pytest.mark.parametrize("preset", ["hest-code", "paper"])
def test_ridge_on_raw_embeddings_equals_its_closed_form(preset: str) -> None:
    x_train, y_train, x_test, _ = synthetic(300, 80, 40, 50)
    prediction = fit_predict("ridge", x_train, y_train, x_test, preprocessing=preset)
    alpha = 100 / (40 * 50)
    assert prediction.details["alpha"] == alpha
    weights, bias = closed_form_ridge(x_train, y_train, alpha, intercept=PRESETS[preset].fit_intercept)
    assert_same_predictions(prediction.values, x_test @ weights + bias, preset)


@pytest.mark.parametrize("preset", ["hest-code", "paper"])
def test_pca_ridge_equals_svd_projection_then_closed_form(preset: str) -> None:
    x_train, y_train, x_test, _ = synthetic(400, 60, 300, 50, seed=1)
    prediction = fit_predict("pca_ridge", x_train, y_train, x_test, preprocessing=preset)
    if PRESETS[preset].standardize_before_pca:
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    centre = x_train.mean(axis=0)
    _, _, components = np.linalg.svd(x_train - centre, full_matrices=False)
    z_train, z_test = (x_train - centre) @ components[:256].T, (x_test - centre) @ components[:256].T
    alpha = 100 / (256 * 50)
    weights, bias = closed_form_ridge(z_train, y_train, alpha, intercept=PRESETS[preset].fit_intercept)
    assert prediction.details["alpha"] == alpha
    assert prediction.details["n_components"] == 256
    assert_same_predictions(prediction.values, z_test @ weights + bias, preset)


def test_pca_keeps_fewer_components_when_the_fold_has_fewer_samples_or_features() -> None:
    x_train, y_train, x_test, _ = synthetic(100, 10, 30, 5)
    prediction = fit_predict("pca_ridge", x_train, y_train, x_test)
    assert prediction.details["n_components"] == 30
    assert prediction.details["alpha"] == 100 / (30 * 5)


@pytest.mark.parametrize("preset", ["hest-code", "paper"])
def test_xgboost_uses_the_protocol_parameters(preset: str) -> None:
    import xgboost

    x_train, y_train, x_test, _ = synthetic(200, 40, 12, 3, seed=2)
    prediction = fit_predict("xgboost", x_train, y_train, x_test, preprocessing=preset, seed=7, n_jobs=1)
    parameters = {
        "n_estimators": 100,
        "learning_rate": 0.1,
        "max_depth": 3,
        "subsample": 0.8,
        "gamma": 0,
        "reg_alpha": 0,
        "reg_lambda": 1,
    }
    if preset == "hest-code":
        parameters.update(colsample_bytree=0.8, min_child_weight=1)
    assert prediction.details["parameters"] == parameters
    if preset == "hest-code":  # the public configuration gives XGBoost the standardised PCA features
        from sklearn.decomposition import PCA

        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        pca = PCA(n_components=12, svd_solver="full", random_state=7).fit((x_train - mean) / std)
        x_train, x_test = pca.transform((x_train - mean) / std), pca.transform((x_test - mean) / std)
        assert prediction.details["n_components"] == 12
    direct = xgboost.XGBRegressor(**parameters, tree_method="hist", random_state=7, n_jobs=1).fit(x_train, y_train)
    assert np.allclose(prediction.values, direct.predict(x_test), rtol=0, atol=1e-6)
    assert {**XGBOOST_PARAMETERS, **PRESETS[preset].xgboost_extra} == parameters


def test_a_feature_nearly_constant_on_the_training_fold_is_reported() -> None:
    """As on MOB: a feature non-zero in one training spot, used by the test fold, lands far out once standardised."""
    x_train, y_train, x_test, _ = synthetic(60, 40, 8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureRangeWarning)
        ordinary = fit_predict("pca_ridge", x_train, y_train, x_test, preprocessing="hest-code")
    assert ordinary.details["max_abs_test_z"] < 10
    x_train[:, 5], x_test[:, 5] = 0.0, 0.0
    x_train[7, 5], x_test[3, 5] = 0.01, 2.0
    train_sd = np.std(x_train[:, 5])  # what the scaler divides by
    expected_z = (2.0 - x_train[:, 5].mean()) / train_sd
    with pytest.warns(FeatureRangeWarning, match=f"reach {expected_z:.0f} training standard deviations \\(feature 5"):
        shifted = fit_predict("pca_ridge", x_train, y_train, x_test, preprocessing="hest-code")
    assert shifted.details["max_abs_test_z_feature"] == 5
    assert shifted.details["max_abs_test_z"] == pytest.approx(expected_z, abs=0.05)
    assert "max_abs_test_z" not in fit_predict("pca_ridge", x_train, y_train, x_test, preprocessing="paper").details


def test_pearson_per_gene_equals_numpy_corrcoef() -> None:
    rng = np.random.default_rng(4)
    measured = rng.poisson(3, size=(120, 20)).astype(float)
    predicted = measured * rng.uniform(-1, 1, 20) + rng.normal(scale=2, size=(120, 20))
    expected = [np.corrcoef(measured[:, g], predicted[:, g])[0, 1] for g in range(20)]
    assert np.allclose(pearson_per_gene(measured, predicted), expected, rtol=0, atol=1e-12)


def test_pearson_is_undefined_for_constant_genes_and_left_out_of_the_fold_mean() -> None:
    measured = np.array([[1.0, 2.0, 0.0], [2.0, 2.0, 1.0], [4.0, 2.0, 3.0]])
    predicted = np.array([[1.0, 1.0, 5.0], [3.0, 2.0, 5.0], [4.0, 3.0, 5.0]])
    r = pearson_per_gene(measured, predicted)
    assert r[0] == pytest.approx(np.corrcoef(measured[:, 0], predicted[:, 0])[0, 1])
    assert np.isnan(r[1]) and np.isnan(r[2])  # constant measured, constant predicted
    assert np.isnan(pearson_per_gene(measured[:1], predicted[:1])).all()  # a single spot has no r
    fold = FoldResult(0, ["a"], ["b"], 3, 3, r)
    assert fold.mean == pytest.approx(r[0])
    assert fold.n_undefined == 2


def test_evaluate_trains_on_train_samples_and_scores_test_samples() -> None:
    x_a, y_a, x_b, y_b = synthetic(150, 120, 20, 4, seed=5)
    embeddings, targets = {"A": x_a, "B": x_b}, {"A": y_a, "B": y_b}
    folds = [Fold(("A",), ("B",)), Fold(("B",), ("A",))]
    result = evaluate("ridge", embeddings, targets, folds, ["g1", "g2", "g3", "g4"], preprocessing="paper")
    for fold, (train, test) in zip(result.folds, [("A", "B"), ("B", "A")], strict=True):
        direct = fit_predict("ridge", embeddings[train], targets[train], embeddings[test], preprocessing="paper")
        expected = [np.corrcoef(targets[test][:, g], direct.values[:, g])[0, 1] for g in range(4)]
        assert np.allclose(fold.pearson, expected, atol=1e-12)
        assert (fold.n_train, fold.n_test) == (len(embeddings[train]), len(embeddings[test]))
    means = [np.mean(fold.pearson) for fold in result.folds]
    assert result.mean == pytest.approx(np.mean(means))
    assert result.std == pytest.approx(np.std(means))


def test_unknown_regressor_and_misaligned_inputs_are_refused() -> None:
    x_train, y_train, x_test, _ = synthetic(20, 5, 4, 2)
    with pytest.raises(InputError, match="unknown regressor 'lasso'"):
        fit_predict("lasso", x_train, y_train, x_test)
    with pytest.raises(InputError, match="do not line up"):
        fit_predict("ridge", x_train, y_train[:10], x_test)
    with pytest.raises(InputError, match="unknown preprocessing 'papr'"):
        fit_predict("ridge", x_train, y_train, x_test, preprocessing="papr")
