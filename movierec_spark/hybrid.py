"""The hybrid model: MLlib GBTRegressor over the handcrafted features and the ALS output.

Trained on the train part's out-of-fold features (see features.py), so what it learns about
"how much to trust ALS for this user" is learned from predictions ALS made without the row;
trained on in-sample features it would learn to copy an over-fitted ALS.
"""

from __future__ import annotations

import logging

from pyspark.ml import PipelineModel
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import GBTRegressor
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .config import HybridConfig
from .features import FEATURES, gbt_input, gbt_sample
from .session import release
from .tables import FEATURE_GROUPS

log = logging.getLogger(__name__)


def model_features(cfg: HybridConfig) -> list[str]:
    """The feature columns the GBT takes: FEATURES less `exclude_features` (columns or groups)."""
    out = set()
    for name in cfg.exclude_features:
        if name in FEATURE_GROUPS:
            out.update(FEATURE_GROUPS[name])
        elif name in FEATURES:
            out.add(name)
        else:
            raise ValueError(f"hybrid.exclude_features: unknown feature or group {name!r} (groups: "
                             f"{', '.join(FEATURE_GROUPS)}; columns: the features table's)")
    return [f for f in FEATURES if f not in out]


def fit_hybrid(train_features: DataFrame, cfg: HybridConfig, seed: int,
               cols: list[str] | None = None) -> tuple[PipelineModel, list[tuple[str, float]], int]:
    """Fit assembler + GBT on labelled feature rows; returns the model, importances (desc) and
    the number of trees. Rows with a true `is_val` column are not trained on; with
    `validation_tol` set, MLlib stops boosting once their error improves by less than that
    share (validationIndicatorCol). `cols`: the feature columns (default model_features(cfg))."""
    from pyspark.ml import Pipeline

    data = train_features.where(F.col("label").isNotNull())
    if cfg.max_train_rows:
        n = data.count()
        if n > cfg.max_train_rows:
            # A hash sample, so reruns train on the same rows.
            frac = cfg.max_train_rows / n
            data = data.where(gbt_sample(seed, frac))
            log.info("hybrid: GBT trained on a %.1f%% hash sample of %d rows", 100 * frac, n)
    gbt = GBTRegressor(featuresCol="x", labelCol="label", predictionCol="raw", maxIter=cfg.max_iter,
                       maxDepth=cfg.max_depth, stepSize=cfg.step_size, subsamplingRate=cfg.subsample,
                       minInstancesPerNode=cfg.min_instances_per_node, seed=seed,
                       featureSubsetStrategy=cfg.feature_subset,
                       # Node-id caching pays off for deep trees; for these (depth 5) it cost
                       # time: on ml-latest-small the 80-tree fit took 30.6 s with it and 22.2 s
                       # without, same RMSE (0.8329).
                       cacheNodeIds=False, checkpointInterval=10)
    if "is_val" in data.columns:
        if cfg.validation_tol is None:  # measured, not used to stop: all max_iter trees
            data = data.where(~F.col("is_val")).drop("is_val")
        else:
            gbt = gbt.setValidationIndicatorCol("is_val").setParams(validationTol=cfg.validation_tol)
    data = gbt_input(data)
    cols = cols or model_features(cfg)
    model = Pipeline(stages=[VectorAssembler(inputCols=cols, outputCol="x", handleInvalid="keep"), gbt]).fit(data)
    imp = model.stages[-1].featureImportances.toArray()
    ranked = sorted(zip(cols, imp.tolist()), key=lambda t: -t[1])
    trees = model.stages[-1].getNumTrees
    log.info("hybrid: %d of at most %d trees", trees, cfg.max_iter)
    release(data)
    return model, ranked, trees


def predict_hybrid(model: PipelineModel, features: DataFrame, lo: float = 0.5, hi: float = 5.0) -> DataFrame:
    """features + prediction (the GBT's output clipped to the rating scale)."""
    out = model.transform(features)
    return out.withColumn("prediction", F.least(F.greatest(F.col("raw"), F.lit(lo)), F.lit(hi))).drop("x", "raw")
