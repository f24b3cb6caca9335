"""The HEST-Benchmark protocol, versioned: every constant and option a result depends on, in one place.

The protocol follows the HEST-1k paper (Jaume et al., NeurIPS 2024, appendix C.3). Where the paper's text and
the public HEST-Library code differ (feature scaling, Ridge intercept and solver, XGBoost's column subsampling),
the choice is a named :class:`Preprocessing` preset, recorded with every result:

========================  ==========================================  ===========================================
step                      ``"hest-code"`` (default: the public code)  ``"paper"`` (the paper's text, literally)
========================  ==========================================  ===========================================
before PCA                standardise each feature (train-fold mean   none (PCA centres on the train fold)
                          and standard deviation)
PCA                       256 components, exact SVD, fit on the      same
                          train fold
Ridge (both regressors)   no intercept, LSQR solver (max 1000        intercept, exact Cholesky solver
                          iterations, tol 1e-4)
Ridge L2 coefficient      ``100 / (M * C)``, M = features entering   same
                          the Ridge (256 after PCA), C = targets
XGBoost inputs            the PCA features above (the public         raw embeddings
                          configuration reduces before every
                          regressor)
XGBoost                   the paper's parameters, plus               the paper's parameters only
                          ``colsample_bytree=0.8``
========================  ==========================================  ===========================================

Gene selection (:mod:`hest_zarr.bench.genes`), targets (log1p of raw counts), folds (patients never shared
between train and test) and the metric (Pearson per gene on the test fold, averaged over genes; mean and
standard deviation, ``ddof=0``, across folds) are the same in both presets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

#: Version of the protocol; recorded in task files and results. Bump it when any constant below changes.
PROTOCOL_VERSION: Final = "hest-bench-1.0"

#: Patch geometry: 224 px at 0.5 um/px, i.e. a 112 x 112 um field of view centred on the spot.
PATCH_SIZE_PX: Final = 224
PATCH_PIXEL_SIZE_UM: Final = 0.5

#: Gene selection: genes with non-zero counts in fewer than this fraction of a sample's spots are dropped ...
MIN_EXPRESSED_FRACTION: Final = 0.10
#: ... and the most variable ones are kept.
N_GENES: Final = 50

#: Regressors, in the order of the paper's tables.
REGRESSORS: Final = ("pca_ridge", "ridge", "xgboost")
RegressorName = Literal["pca_ridge", "ridge", "xgboost"]
PCA_COMPONENTS: Final = 256
#: Ridge's L2 coefficient is ``RIDGE_ALPHA_NUMERATOR / (M * C)``.
RIDGE_ALPHA_NUMERATOR: Final = 100.0
#: XGBoost parameters of the paper (appendix C.3).
XGBOOST_PARAMETERS: Final[dict[str, Any]] = {
    "n_estimators": 100,
    "learning_rate": 0.1,
    "max_depth": 3,
    "subsample": 0.8,
    "gamma": 0.0,
    "reg_alpha": 0.0,
    "reg_lambda": 1.0,
}
#: Random seed of PCA, Ridge's solver and XGBoost's subsampling (the public code's default).
DEFAULT_SEED: Final = 1


@dataclass(frozen=True)
class Preprocessing:
    """What the paper leaves open: scaling, intercept, solver and extra XGBoost parameters.

    Attributes
    ----------
    name
        Preset name, recorded with the results.
    standardize_before_pca
        Standardise every feature (train-fold mean and standard deviation) before PCA.
    fit_intercept
        Fit Ridge's intercept (otherwise the regression goes through the origin).
    ridge_solver, ridge_max_iter, ridge_tol
        scikit-learn ``Ridge`` solver settings.
    pca_svd_solver
        scikit-learn ``PCA`` solver (``"full"``: exact, deterministic).
    xgboost_on_pca
        Give XGBoost the (standardised, per ``standardize_before_pca``) PCA features instead of the embeddings.
    xgboost_extra
        XGBoost parameters added to :data:`XGBOOST_PARAMETERS`.

    """

    name: str
    standardize_before_pca: bool
    fit_intercept: bool
    ridge_solver: str
    ridge_max_iter: int | None
    ridge_tol: float
    pca_svd_solver: str = "full"
    xgboost_on_pca: bool = False
    xgboost_extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the preset as a JSON-ready dict.

        Examples
        --------
        >>> PRESETS["paper"].to_dict()["fit_intercept"]
        True

        """
        return asdict(self)


PRESETS: Final[dict[str, Preprocessing]] = {
    "hest-code": Preprocessing(
        name="hest-code",
        standardize_before_pca=True,
        fit_intercept=False,
        ridge_solver="lsqr",
        ridge_max_iter=1000,
        ridge_tol=1e-4,
        xgboost_on_pca=True,
        xgboost_extra={"colsample_bytree": 0.8, "min_child_weight": 1},
    ),
    "paper": Preprocessing(
        name="paper",
        standardize_before_pca=False,
        fit_intercept=True,
        ridge_solver="cholesky",
        ridge_max_iter=None,
        ridge_tol=1e-4,
    ),
}
DEFAULT_PRESET: Final = "hest-code"


def protocol_record(preprocessing: Preprocessing, seed: int) -> dict[str, Any]:
    """Return every protocol constant and option, as recorded in results files.

    Examples
    --------
    >>> protocol_record(PRESETS["hest-code"], seed=1)["version"]
    'hest-bench-1.0'

    """
    return {
        "version": PROTOCOL_VERSION,
        "patch": {"size_px": PATCH_SIZE_PX, "pixel_size_um": PATCH_PIXEL_SIZE_UM},
        "genes": {
            "n_genes": N_GENES,
            "min_expressed_fraction": MIN_EXPRESSED_FRACTION,
            "min_expressed_scope": "every sample",
        },
        "targets": "log1p(raw counts)",
        "regressors": list(REGRESSORS),
        "pca_components": PCA_COMPONENTS,
        "ridge_alpha": f"{RIDGE_ALPHA_NUMERATOR:g} / (M * C), M = features entering the Ridge, C = targets",
        "xgboost": {**XGBOOST_PARAMETERS, **preprocessing.xgboost_extra},
        "xgboost_inputs": "PCA features" if preprocessing.xgboost_on_pca else "embeddings",
        "metric": "Pearson r per gene on the test fold, mean over genes with a defined r; mean and std (ddof=0) "
        "across folds",
        "preprocessing": preprocessing.to_dict(),
        "seed": seed,
    }
