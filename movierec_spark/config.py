"""One typed configuration object, loaded from YAML and overridden from the command line.

Everything is validated before Spark starts: an unknown key, a wrong type or a missing path is a
ConfigError naming the file and the key, because a typo found after a 20-minute job is expensive.
YAML is parsed with ``safe_load`` only: a config file must never construct Python objects.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

log = logging.getLogger(__name__)

# The default settings are package data (movierec_spark/conf/), read with importlib.resources:
# they load wherever the package is imported from, also from a wheel or zip on spark-submit's
# --py-files, where no conf/ directory exists beside it (cluster deploy mode has no local files at
# all). In a checkout, conf/local.yaml and conf/log4j2.properties are links to them.
# Both names are relative to the package, and the same names relative to the repo root.
DEFAULT_CONFIG = "conf/local.yaml"
DEFAULT_LOG4J = "conf/log4j2.properties"
# A checkout's root (the package's parent): relative paths in a config are tried there too.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"




class ConfigError(ValueError):
    """A configuration problem found before any heavy work starts."""


class Section(BaseModel):
    """A config section: typed, strict (no silent coercion: `true` is not an integer, "4" is not a
    number), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SparkConfig(Section):
    master: str = "local[*]"
    app_name: str = "movierec"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(8, ge=1)
    ui_enabled: bool = False
    show_progress: bool = True
    # log4j2 properties file. The default, conf/log4j2.properties, is the working directory's file
    # of that name if there is one, else the packaged movierec_spark/conf/log4j2.properties (see
    # resolve_log4j); other relative paths are tried against the working directory, then the repo.
    log4j_config: str = DEFAULT_LOG4J
    # A project-owned Ivy cache: Delta's jars are resolved into it once and reused offline, and
    # stray poms in ~/.m2 cannot break resolution.
    ivy_dir: str = "~/.cache/movierec/ivy"
    delta_package: str = DELTA_PACKAGE
    # Extra Maven coordinates on the classpath, resolved and cached like Delta's: the connector
    # of an object store (s3a://: org.apache.hadoop:hadoop-aws:3.5.0; README, "Object storage").
    packages: list[str] = Field(default_factory=list)
    # Any other spark.* settings, passed through verbatim.
    conf: dict[str, str] = Field(default_factory=dict)

    @field_validator("conf", mode="before")
    @classmethod
    def _spark_strings(cls, v: Any) -> Any:
        # Spark settings are strings, but YAML reads `4` or `true` as scalars; they mean the same.
        if isinstance(v, dict):
            return {str(k): str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, (int, float)) else x
                    for k, x in v.items()}
        return v


class PathsConfig(Section):
    warehouse: str = "warehouse"
    input: str | None = None
    # Defaults to <warehouse>/_checkpoints; iterative algorithms (ALS) truncate lineage there.
    checkpoint_dir: str | None = None
    # Where `movierec run` without --input keeps the downloaded or generated default dataset.
    data_dir: str = "data"


class IngestConfig(Section):
    # Share of rejected input rows above which ingest stops without touching any table.
    reject_threshold: float = 0.05
    # Files up to this size are decoded whole (exact line numbers in any encoding, embedded
    # newlines visible); larger ones are split across tasks and must be ASCII-compatible.
    whole_file_max_bytes: int = 32 * 1024 * 1024
    max_uncompressed_bytes: int = 8 * 1024**3
    # The input holds new and changed rows only (e.g. just a ratings.csv): they are merged into
    # the warehouse, and when nothing changed the run stops after ingest (see README).
    incremental: bool = False
    # The input replaces the warehouse's dataset (another source than the one it holds): every
    # ingested table becomes the input exactly, rows absent from it are deleted (--replace).
    replace: bool = False


class DemoConfig(Section):
    """The generated MovieLens-shaped set used when no --input is given and GroupLens is offline."""

    users: int = Field(600, ge=1)
    movies: int = Field(3000, ge=1)
    ratings: int = Field(100_000, ge=1)


class SplitConfig(Section):
    # random | stratified (per user) | temporal_global | temporal_user (last n per user) |
    # cold_users (a hash share `cold_ratio` of users keep their `cold_keep` earliest ratings in
    # train, the rest of theirs is test; every other user is all train: new-user evaluation)
    method: Literal["random", "stratified", "temporal_global", "temporal_user", "cold_users"] = "random"
    test_ratio: float = Field(0.2, gt=0, lt=1)
    cold_ratio: float = Field(0.2, gt=0, lt=1)
    cold_keep: int = Field(3, ge=1)
    # temporal_global: ISO date/time; when unset, the (1 - test_ratio) quantile of rated_at.
    cutoff: str | None = None
    last_n: int = 1
    # A predefined split (e.g. ml-100k's u1.base / u1.test) replaces the splitter when both are set.
    train_file: str | None = None
    test_file: str | None = None

    @field_validator("cutoff", mode="before")
    @classmethod
    def _date_text(cls, v: Any) -> Any:
        # An unquoted YAML date (cutoff: 2018-01-01) arrives as a date: it means the same text.
        return v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v


class BaselineConfig(Section):
    # Koren's shrinkage: item and user biases are pulled towards 0 by these pseudo-counts (chosen
    # on validation: conf/local.yaml).
    item_reg: float = 2.0
    user_reg: float = 5.0
    iterations: int = 2


class AlsConfig(Section):
    rank: int = 20
    max_iter: int = 15
    reg_param: float = 0.15
    # Fit ALS to the residuals of the bias baseline: Spark's ALS has no bias terms.
    residual: bool = True
    # Truncate the lineage every N iterations (needs the checkpoint dir). 10 is MLlib's default;
    # 5 wrote 3 checkpoints in 15 iterations and cost 0.6-1.8 s per fit on ml-latest-small.
    checkpoint_interval: int = 10
    # ALS user/item blocks; null = one per core Spark has (see als.als_blocks).
    num_blocks: int | None = Field(None, ge=1)
    # Explicit ALS's own top-N lists (evaluation only: it ranks badly, nDCG@10 0.047 against
    # implicit ALS's 0.324 on ml-latest-small). They cost a users x movies scoring pass: 216 s
    # of the als stage's 357 s at 25M ratings, so conf/scale.yaml turns them off.
    top_n: bool = True
    tune: bool = False
    tune_ranks: list[int] = Field(default_factory=lambda: [8, 12, 20])
    tune_reg_params: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.15])
    tune_max_iters: list[int] = Field(default_factory=lambda: [15])


class ImplicitAlsConfig(Section):
    # Chosen by tune.py's search on a validation fold of ml-latest-small's stratified train part
    # (conf/local.yaml says more); a run with tune on chooses its own, starting here.
    rank: int = 20
    max_iter: int = 15
    reg_param: float = 0.05
    alpha: float = 5.0
    # How a rating becomes implicit confidence: "binary" (1 per rating) or "rating" (the rating).
    confidence: Literal["binary", "rating"] = "binary"
    # Ratings below this do not count as a positive signal at all.
    min_rating: float = 0.0
    # ALS user/item blocks; null = one per core Spark has (see als.als_blocks).
    num_blocks: int | None = Field(None, ge=1)


class ContentConfig(Section):
    # Block weights: each block is L2-normalised, multiplied by its weight, then the whole
    # vector is normalised again.
    genre_weight: float = 1.0
    tag_weight: float = 1.0
    genome_weight: float = 1.0
    year_weight: float = 0.5
    # Title words (content.title_tokens: franchise names, TF-IDF, sequel markers dropped): what
    # ties a sequel to its film when genres, tags and decade do not. 1.0 like the other blocks
    # (not tuned: benchmarks/franchise_benchmark.py reports its recall).
    title_weight: float = 1.0
    # A tag must be used on at least this many movies to become a feature.
    min_tag_movies: int = 1
    k: int = 20
    # exact (every pair via MLlib's blocked product; small catalogs), lsh, or auto (exact up to exact_max_movies).
    method: Literal["auto", "exact", "lsh"] = "auto"
    exact_max_movies: int = 20000
    # SimHash banding: bits per table (higher = tighter buckets), tables (more = higher recall),
    # and the most movies compared with each other inside one bucket.
    # Measured on ml-latest-small (issue 4): 8/16/128 gives recall@10 0.97 against exact;
    # 10/12/64 0.91 and 8/16/64 0.95.
    lsh_bits: int = 8
    lsh_tables: int = 16
    lsh_bucket_cap: int = 128
    # Tag vocabulary cap (most used tags first) so dense vectors stay narrow on ml-25m.
    max_tags: int = 2000
    # Content user model: a user's liked movies used as sources (their best first), the
    # neighbours taken from each, and the shrinkage of the kNN rating prediction.
    user_sources: int = 30
    user_neighbours: int = 20
    predict_shrink: float = 1.0


class HybridConfig(Section):
    # Out-of-fold features: train is cut into `folds` by a hash of (user, movie, seed); each of
    # the first `oof_folds` folds gets features from the other folds. null = automatic: all
    # folds, unless train exceeds `max_train_rows`, then only the folds (and the hash sample of
    # their rows) the GBT would train on (features.oof_plan): 1 pass instead of 5 at 25M.
    folds: int = Field(5, ge=2)  # out-of-fold features need a held-out fold
    oof_folds: int | None = None
    # Where the test rows' features come from: "full" (ALS, statistics and neighbours fitted on
    # the whole train part, one extra pass), "fold" (the same fits as fold 0's rows: train minus
    # fold 0), or "auto": "fold" when the out-of-fold plan is a single sampled fold (large data,
    # where a pass is the stage's cost), else "full".
    test_features: Literal["auto", "full", "fold"] = "auto"
    # Feature passes (one per out-of-fold fold, plus the test pass) computed side by side. 1:
    # two threads made the stage slower on this 2-core machine (ml-latest-small: 117.4 s against
    # 97.0 s one pass at a time; measured while threaded passes still fitted ALS with 10 blocks,
    # since fixed), and each pass's caches add to the heap.
    feature_threads: int = Field(1, ge=1)
    # The passes' user-user and movie-movie neighbour lists from one co-rating self-join each,
    # summing every pass's co-ratings at once (features.fold_neighbours), instead of two
    # self-joins per pass: ml-latest-small's six passes 25 s instead of about 120 s. The caps
    # then sample each movie's (user's) ratings once for all passes. A one-pass plan (25M
    # ratings) keeps its own self-joins. false: per pass.
    shared_neighbours: bool = True
    # With shared_neighbours: the out-of-fold passes computed as one batch, each pass's ratings
    # under ids of their own (features.batched_pass_features), so every Spark job serves all
    # passes; false: one pass after another (the same features up to ALS's random start).
    batched_passes: bool = True
    # Neighbour lists for sur/smr: kept per user/movie, co-ratings required, and the caps that
    # bound the co-rating self-joins (null = no cap: exact similarities).
    neighbours: int = 30
    min_common: int = 2
    # 300/300 ran out of a 6 GB heap on ml-latest-small (20M+ co-rating pairs in one hash
    # aggregate); 100/100 keeps the self-joins to a few million pairs.
    cap_per_movie: int | None = 100
    cap_per_user: int | None = 100
    # Shrinkage of the kNN-baseline features (sum sim x residual / (sum sim + knn_shrink)) and of
    # the rating-day residual (sum residual / (day_n + day_shrink)): a neighbour or a same-day
    # rating or two pulls little. Set by hand, not tuned.
    knn_shrink: float = Field(1.0, ge=0)
    day_shrink: float = Field(2.0, ge=0)
    # Feature columns or groups (knn, day, time, implicit: tables.FEATURE_GROUPS) the GBT leaves
    # out. Chosen by backward elimination on the hybrid's validation rows of an ml-latest-small
    # random 80/20 run (benchmarks/feature_ablation.py, results/feature-ablation-ml-latest-small.md):
    # with every group, validation RMSE 0.8236; without knn 0.8209 (the residual ALS and smr1-5
    # already carry it); then without implicit 0.8202; leaving out day or time instead raised it.
    # Excluded columns are still computed into the features table (knn, day and time come from
    # joins the other features make anyway), except implicit: with it excluded, no implicit ALS
    # is fitted and its column is 0.
    exclude_features: list[str] = Field(default_factory=lambda: ["knn", "implicit"])
    # User demographics (the demo group: ml-100k's u.user, ml-1m's users.dat). "auto": where the
    # run's users have them, the hybrid stage fits the GBT with and without the group and keeps
    # the group only where it lowers the validation RMSE (by demographics_min_gain; one more GBT
    # fit; a dataset without demographics costs nothing); "on" / "off": always / never (off also
    # when listed in exclude_features).
    demographics: Literal["auto", "on", "off"] = "auto"
    # auto keeps the group only when it lowers the validation RMSE by at least this much: with
    # random (pure noise) demographics on ml-latest-small in the ml-100k layout, two runs measured
    # +0.0029 and -0.0002 (kept by a hair without a margin), so a smaller gain is not told from noise.
    demographics_min_gain: float = Field(0.002, ge=0)
    # Shrinkage of demo_res and occ_res (a movie's mean residual among similar users: sum / (n +
    # demo_shrink)). Set by hand, not tuned: no dataset here has demographics.
    demo_shrink: float = Field(5.0, ge=0)
    # MLlib GBTRegressor. Trees and depth chosen on the hybrid's validation rows of an
    # ml-latest-small random 80/20 run, with the features above (benchmarks/gbt_settings.py,
    # results/gbt-settings-ml-latest-small.md): validation RMSE 80x5 0.8202 (the old default,
    # picked on a test split), 150x5 0.8184, 80x6 0.8232, 150x6 0.8241, 250x5 0.8184, 150x4
    # 0.8171, 250x4 0.8167, 150x3 0.8192. 150x4: the smallest within 0.001 of the best, at half
    # 250x4's fit time.
    max_iter: int = 150
    max_depth: int = 4
    step_size: float = 0.1
    # Share of rows each tree draws. 1.0 (was 0.8), on validation rows only
    # (benchmarks/results/gbt-subsample.md, gbt_settings.py --subsamples 0.8,1.0): ml-latest-small
    # random 80/20, three seeds each, RMSE 0.8178 -> 0.8174 in the mean, fits 60 -> 53 s (the
    # later two seeds); 1M generated ratings 0.7350 both, 229 -> 223 s. MLlib skips the draw.
    subsample: float = 1.0
    min_instances_per_node: int = 20
    # Features each tree node considers (MLlib's featureSubsetStrategy: "all", "onethird",
    # "sqrt", "log2", a share such as "0.5", or a count). Measured on the 1M harness run's
    # validation rows (benchmarks/results/gbt-feature-subset-1M.md): "0.5" saved 18% of the fit
    # for +0.0010 validation RMSE, "onethird" 22% for +0.0029, so "all".
    feature_subset: str = "all"
    # Train the GBT on at most this many out-of-fold rows (a hash sample; null = all).
    max_train_rows: int | None = 2_000_000
    # Share of the GBT's out-of-fold rows (a hash of user, movie, seed) it does not train on:
    # their RMSE/MAE are the run's validation metrics (the only rating-quality signal a serve
    # run, which has no test part, can give). 0 = train on every row, no validation figures.
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    # Early stopping on those rows (MLlib's validationIndicatorCol and validationTol: stop when
    # their error improves by less than this share); null = all max_iter trees. Chosen on the
    # validation rows of an ml-latest-small random 80/20 train part (benchmarks/gbt_stopping.py):
    # 0.001 stopped at 11 trees (validation RMSE 0.8459), 1e-4, 1e-5 and 0 at 25 (0.8415, the
    # first uptick of a noisy curve), no stopping 80 trees 0.8381. So null.
    validation_tol: float | None = None
    # Final recommendations: candidates are these models' top-N lists of this run (train
    # movies already excluded), rescored by the hybrid.
    candidate_models: list[Literal["als_implicit", "als", "content", "popularity"]] = Field(
        default_factory=lambda: ["als_implicit", "content", "popularity"], min_length=1)
    # What orders the candidates: "hybrid" (its predicted rating) or "learned" (a GBT classifier
    # trained on a held-out fold of train to predict which candidates the user goes on to rate;
    # see ranker.py).
    ranker: Literal["learned", "hybrid"] = "learned"
    # Learned ranker: implicit ALS contributes its top `candidate_pool`; item-kNN co-occurrence
    # score from each movie's top `ranker_knn_neighbours` (0 = off; cap_per_user bounds its
    # self-join). The pool (100), depth (4) and trees (30) were chosen by the ranker's own
    # validation users on ml-latest-small's stratified 75/25 train part
    # (benchmarks/ranker_settings.py; nDCG@10 0.2024 there against 0.1787 for the old pool of
    # 50, which an earlier issue had read off that split's test part). With tuning on, the pool
    # and depth are the start of the run's own search (tune.ranker, TuneConfig).
    candidate_pool: int = Field(100, ge=1)
    ranker_knn_neighbours: int = Field(50, ge=0)
    # Ratings per user in the item-kNN co-occurrence self-join (null: cap_per_user).
    ranker_knn_cap: int | None = None
    # The ranker trains on the candidate lists of at most this many users (a hash sample of
    # users; null = all): its training set and the lists behind it stop growing with the data.
    ranker_max_users: int | None = Field(20_000, ge=1)
    ranker_max_iter: int = Field(30, ge=1)
    ranker_max_depth: int = Field(4, ge=1)
    # Share of the candidate rows each of the ranker's trees draws. 1.0 (every row; was 0.8):
    # chosen on the ranker's validation users, five GBT seeds each, on ml-latest-small's
    # stratified 75/25 and random 80/20 train parts (benchmarks/ranker_settings.py --seeds 5,
    # benchmarks/results/ranker-seeds-ml-latest-small.md): nDCG@10 0.1846 -> 0.1860 and
    # 0.2044 -> 0.2078 in the mean, about 14% less time per fit (MLlib skips the Poisson draw).
    # The spread over seeds (sd 0.002-0.005) did not shrink with it: the split candidates are
    # still drawn from a sample of the rows.
    ranker_subsample: float = Field(1.0, gt=0, le=1)
    # The ranker's m_active feature: the movie's train ratings within this many days of the
    # user's median rating time (0 = off). Kept on validation (benchmarks/ranker_settings.py
    # --set hybrid.ranker_active_days=0|180 on ml-latest-small's stratified 75/25 train part,
    # three seeds, i.e. three folds and validation-user draws): nDCG@10 0.1777/0.1722/0.1819
    # without, 0.1824/0.1768/0.1813 with (mean +0.003, within the ranker's noise) and recall@10
    # higher in all three (+0.005/+0.003/+0.002). About 10 s more per ranker fit there.
    ranker_active_days: int = Field(180, ge=0)
    # The ranker learns from models and counts over train outside one fold ((folds - 1) / folds
    # of it) and serves from all of train, where every count is folds / (folds - 1) times larger.
    # true: its count features (ratings per user and movie, popularity, rated kNN neighbours,
    # ratings around the user's time) are divided by that share while it learns, so its
    # thresholds sit on the served scale. Chosen on nested validation data (a train part split
    # again, benchmarks/nested_split.py): nDCG@10 +0.0057 and +0.0007 at two inner seeds
    # (benchmarks/results/ranker-rescale-nested-ml-latest-small.md).
    ranker_rescale_counts: bool = True
    # Share of the ranker's users (a hash of the user and seed) whose candidates it does not
    # train on: its final lists for them, scored against their held-out fold, are the run's
    # validation ranking metrics. 0 = no validation figures.
    ranker_validation_users: float = Field(0.2, ge=0, lt=1)


class EvaluationConfig(Section):
    ks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 5, 10, 20], min_length=1)
    # Test items that count as relevant for ranking metrics; null = every held-out item.
    relevance_threshold: float | None = None
    top_n: int = Field(10, ge=1)
    # Evaluate runs: the final lists re-ranked by MMR at each of these lambdas as well (model
    # "hybrid_mmr<lambda>" in metrics; the top max(ks) re-ordered, so @max(ks) is unchanged
    # when top_n <= max(ks); lambda 0 is the run's lists, with its own recommend.diversity):
    # the accuracy / diversity trade-off in one run. [] = off.
    diversity_sweep: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=list)


class RecommendConfig(Section):
    """The final lists beyond the learned ranker (recommend.py)."""
    # New users: a user with at most this many train ratings (0: off) gets a blend of popularity,
    # popularity among the ratings made within `new_user_window_days` of their latest rating, and
    # content neighbours of what they liked (reciprocal-rank fusion, weights 1 / 1 /
    # new_user_content_weight), moving to the ranker's order as history grows: the ranker's
    # share is n / (new_user_max_ratings + 1). Chosen on simulated new users carved from a train
    # part (benchmarks/cold_start.py; no test rating read): popularity 0.4231 nDCG@10 there,
    # popularity when active (180 days) 0.4738, both 0.4869, content alone 0.0466, with content
    # at 1/4 0.4853 (content at weight 1 halved it: 0.2794).
    new_user_max_ratings: int = Field(5, ge=0)
    new_user_window_days: int = Field(180, ge=1)
    new_user_content_weight: float = Field(0.25, ge=0)
    # Diversity on request: each final list re-ranked by maximal marginal relevance over content
    # similarity (recommend.mmr_rerank), lambda in [0, 1]; 0 = the ranker's order, unchanged.
    # The re-rank chooses among the top diversity_pool x n ranked candidates, and a movie more
    # similar than near_duplicate to the previous pick waits while another is left.
    diversity: float = Field(0.0, ge=0, le=1)
    diversity_pool: int = Field(2, ge=1)
    near_duplicate: float = Field(0.9, gt=0, le=1)
    # New movies: how many of the n positions may go to movies nobody has rated (in train) from
    # the user's content list ("because you liked X"); 0 = never (the ranker alone cannot place
    # a movie without ratings). Off by default: on a test split such a slot is mostly a miss,
    # so it is a product choice (discovery), not an accuracy one.
    new_movie_slots: int = Field(0, ge=0)


class TuneConfig(Section):
    """Settings chosen on validation data carved from the train part (tune.py), never on a test
    part. Today: implicit ALS's rank, reg_param, alpha and confidence, by a coordinate search
    (rank, reg_param, then alpha and confidence together; the others held at the best so far)."""
    # auto: tune when the train part has at most `max_ratings` ratings (a serve run first reuses
    # an earlier run's choice, see reuse_max_change); true: always; false: the config's values.
    enabled: bool | Literal["auto"] = "auto"
    max_ratings: int = Field(1_500_000, ge=1)
    # Per user, this hash share of their train ratings is held out (users with at least
    # `min_user_ratings` train ratings); the candidates are fitted on the rest and scored by
    # nDCG@10 of their top-10 unseen lists against it.
    validation_ratio: float = Field(0.2, gt=0, lt=1)
    min_user_ratings: int = Field(5, ge=2)
    # A run reuses the newest succeeded run's choice on this warehouse while its train part's
    # size differs from the one that run tuned on by at most this share (0: always retune).
    reuse_max_change: float = Field(0.1, ge=0)
    # The rating models too (tune.py tune_rating_models): the bias baseline's shrinkage, then the
    # residual ALS's rank and reg_param, by RMSE on the same validation fold (false: the config's).
    rating_models: bool = True
    baseline_item_regs: list[float] = Field(default_factory=lambda: [0.5, 5.0, 25.0], min_length=1)
    baseline_user_regs: list[float] = Field(default_factory=lambda: [1.0, 10.0], min_length=1)
    als_ranks: list[int] = Field(default_factory=lambda: [10, 32], min_length=1)
    als_reg_params: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.25], min_length=1)
    implicit_ranks: list[int] = Field(default_factory=lambda: [10, 20, 32], min_length=1)
    implicit_reg_params: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.1, 0.3], min_length=1)
    implicit_alphas: list[float] = Field(default_factory=lambda: [1.0, 5.0, 10.0, 20.0], min_length=1)
    implicit_confidences: list[Literal["binary", "rating"]] = Field(
        default_factory=lambda: ["binary", "rating"], min_length=1)
    # The learned ranker's candidate pool and depth too (recommend stage, ranker.train_ranker):
    # each candidate ranker is fitted as the stage fits it and scored by nDCG@10 of its lists
    # for the validation users it did not train on (hybrid.ranker_validation_users); pool first,
    # then depth. Pools above hybrid.candidate_pool are skipped (the lists are that long). A
    # candidate replaces the one kept so far only when its mean per-user gain exceeds
    # `ranker_z` standard errors of the per-user differences: on ml-latest-small's ~120
    # validation users one figure moves by about 0.02 between runs of the same setting, so a
    # plain "highest wins" would pick by noise.
    ranker: bool = True
    ranker_pools: list[int] = Field(default_factory=lambda: [50], min_length=1)
    ranker_depths: list[int] = Field(default_factory=lambda: [3, 5], min_length=1)
    ranker_z: float = Field(2.0, ge=0)
    # ALS iterations of each tuning candidate (implicit ALS and the residual ALS; null: the
    # model's own max_iter); the final model is fitted with its max_iter whatever this is. null,
    # measured (benchmarks/tune_iters.py, results/tune-iters-ml-latest-small.md): 8 saved 7-13%
    # of the two searches' time (side by side, a fit's iteration jobs fill the gaps; its setup
    # and scoring cost the time) and changed implicit ALS's choice on the stratified train part.
    trial_max_iter: int | None = Field(None, ge=1)
    # Candidates of one search step fitted side by side, each from its own driver thread (as
    # CrossValidator's `parallelism`): the same choice, since each fit is seeded and the step's
    # candidates do not depend on one another. Small fits leave cores idle between their many
    # short jobs; on this 2-core machine four implicit ALS candidates of ml-latest-small took
    # 23.6 s one at a time, 16.0 s two at a time and 14.3 s four at a time (identical scores).
    parallelism: int = Field(4, ge=1)


class PipelineConfig(Section):
    stages: list[str] = Field(default_factory=lambda: ["ingest"])
    seed: int = 42
    # serve (learn from every rating, write recommendations) or evaluate (held-out test part);
    # `movierec evaluate` and --train/--test set evaluate.
    mode: Literal["serve", "evaluate"] = "serve"
    # Stages run in a background thread beside others (pipeline.OVERLAP: content beside
    # baselines to als_implicit, hybrid beside recommend; on request also als_implicit beside
    # baselines and als, recommend beside features and hybrid): chains of small Spark jobs that
    # leave the cores idle between jobs fill each other's gaps; [] runs every stage in turn.
    # The wider four bought nothing measurable on this 2-core machine (ml-latest-small serve
    # runs twenty minutes apart: 458.8 s with them, 466.4 s without, while the plain ALS example
    # took 27.5 and 35.0 s; side by side, implicit ALS's tuning trials and the features passes
    # took two to three times as long as alone), so the default keeps two.
    overlap: list[Literal["content", "als_implicit", "recommend", "hybrid"]] = Field(
        default_factory=lambda: ["content", "hybrid"])


class Config(Section):
    spark: SparkConfig = Field(default_factory=SparkConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    als: AlsConfig = Field(default_factory=AlsConfig)
    als_implicit: ImplicitAlsConfig = Field(default_factory=ImplicitAlsConfig)
    content: ContentConfig = Field(default_factory=ContentConfig)
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    recommend: RecommendConfig = Field(default_factory=RecommendConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    # Where the file came from, for messages and relative paths; not a user setting.
    _source: str = PrivateAttr(default="<defaults>")

    @property
    def source(self) -> str:
        return self._source

    def to_json(self) -> str:
        """The config as JSON, secrets redacted (what logs and `runs.config` show)."""
        from .redact import redact

        return json.dumps(redact(self.model_dump()), sort_keys=True)

    @property
    def checkpoint_dir(self) -> str:
        return self.paths.checkpoint_dir or join_path(self.paths.warehouse, "_checkpoints")


def join_path(base: str, *parts: str) -> str:
    """Join a local path or a URI (s3a://, file:/, ...) without normalising the scheme away."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def is_uri(path: str) -> bool:
    return "://" in path or path.startswith("file:")


def _parse(data: dict) -> "Config":
    """The config tree validated by the schema; the first problem as one ConfigError line."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_message(e.errors()[0])) from None


def _message(err: dict) -> str:
    """A pydantic error as this project words it: the dotted key, what it must be, what it got."""
    loc = ".".join(str(x) for x in err["loc"])
    kind, got = err["type"], err.get("input")
    if kind == "extra_forbidden":
        model: Any = Config
        for part in err["loc"][:-1]:
            model = model.model_fields[part].annotation
        return f"unknown key '{loc}' (known keys here: {', '.join(sorted(model.model_fields))})"
    expected = {"int": "an integer", "float": "a number", "bool": "true/false", "string": "a string",
                "list": "a list", "dict": "a mapping", "model": "a mapping"}
    for prefix, what in expected.items():
        if kind.startswith(prefix):
            return f"{loc}: expected {what}, got {type(got).__name__ + ' ' if what in ('a list', 'a mapping') else ''}{got!r}"
    if kind == "literal_error":
        return f"{loc}: must be one of {err['ctx']['expected']}, got {got!r}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(err["ctx"].values()))
        return f"{loc} must be {bounds[kind]} {limit}, got {got!r}"
    if kind == "too_short":
        return f"{loc} must not be empty"
    return f"{loc}: {err['msg'].lower()} (got {got!r})"


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    if dotted.startswith("spark.conf."):
        # Spark's own keys are dotted too: everything after spark.conf. is one key
        # (--set spark.conf.spark.hadoop.fs.s3a.endpoint=http://...).
        conf = data.setdefault("spark", {}).setdefault("conf", {})
        conf[dotted[len("spark.conf."):]] = value if isinstance(value, str) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        return
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    check_paths: bool = True,
) -> Config:
    """Load YAML (default: the packaged movierec_spark/conf/local.yaml), apply dotted overrides,
    validate.

    `overrides` maps dotted keys (``paths.warehouse``) to values, e.g. from CLI flags;
    None values are ignored so argparse defaults do not clobber the file.
    """
    if path:
        cfg_path = Path(path)
        if not cfg_path.is_file():
            raise ConfigError(f"config file not found: {cfg_path}")
        text = cfg_path.read_text(encoding="utf-8")
    else:
        resource = package_resource(DEFAULT_CONFIG)
        # For messages and cfg.source only: inside a zip this is <archive>/movierec_spark/conf/...
        cfg_path = Path(str(resource))
        try:
            text = resource.read_text(encoding="utf-8")
        except (OSError, KeyError):  # a zip raises KeyError for a missing member
            raise ConfigError(f"default config not found in the package: {cfg_path} (movierec_spark was "
                              "installed without its package data; reinstall it or pass --config)") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{cfg_path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_path}: top level must be a mapping of sections")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        cfg = _parse(data)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None
    cfg._source = str(cfg_path)
    _validate(cfg, cfg_path, check_paths)
    return cfg


def resolve_local(p: str, base: Path) -> Path:
    path = Path(os.path.expanduser(p))
    if path.is_absolute():
        return path
    # Relative conf paths are tried against the working directory, then the repo root.
    for root in (Path.cwd(), base):
        if (root / path).exists():
            return (root / path).resolve()
    return (Path.cwd() / path).resolve()


def package_resource(name: str) -> Any:
    """A file of the package's data (``conf/local.yaml``) as an importlib.resources Traversable:
    a Path when the package is a directory, a zipfile.Path inside a wheel or zip."""
    res = resources.files(__package__ or "movierec_spark")
    for part in name.split("/"):
        res = res / part
    return res


def _cache_dirs() -> list[Path]:
    dirs = []
    home = os.path.expanduser("~")
    cache = os.environ.get("XDG_CACHE_HOME") or (os.path.join(home, ".cache") if home != "~" else "")
    if os.path.isabs(cache):
        dirs.append(Path(cache) / "movierec" / "package-data")
    # For users without a writable home (the Spark image's user has /nonexistent); per user, as
    # the temp directory is shared.
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    dirs.append(Path(tempfile.gettempdir()) / f"movierec-{user}" / "package-data")
    return dirs


def package_file(name: str) -> Path:
    """A real file with the content of package data `name`, for what needs a path (log4j's
    -Dlog4j.configurationFile=file:...): the package's own file when it is on the filesystem, else
    (imported from a zip or wheel) a copy under ~/.cache/movierec/package-data/, named by its
    content hash so versions and concurrent processes do not collide."""
    res = package_resource(name)
    if isinstance(res, Path):
        return res.resolve()
    data = res.read_bytes()
    stem, _, suffix = Path(name).name.partition(".")
    fname = f"{stem}-{hashlib.sha256(data).hexdigest()[:16]}.{suffix}"
    for d in _cache_dirs():
        target = d / fname
        try:
            if target.is_file() and target.read_bytes() == data:
                return target
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{fname}.")
        except OSError as e:
            log.debug("cannot write %s: %s", target, e)
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)  # atomic: a concurrent reader sees the whole file or none
            return target
        except OSError as e:
            log.debug("cannot write %s: %s", target, e)
            Path(tmp).unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"movierec-{stem}-", suffix=f".{suffix}")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(tmp)


def resolve_log4j(p: str) -> Path:
    """The log4j2 file for spark.log4j_config. The default name (conf/log4j2.properties) is the
    working directory's file of that name if it has one (a checkout's root: the link to the
    packaged file), else the packaged default itself, extracted to a real file when the package is
    imported from a zip; any other path resolves like the config's other local paths."""
    if p == DEFAULT_LOG4J:
        own = Path.cwd() / p
        return own.resolve() if own.is_file() else package_file(DEFAULT_LOG4J)
    return resolve_local(p, PACKAGE_ROOT)


# Below this the driver JVM cannot hold Spark, Delta's log replay and a GBT fit at once: the
# run would die with OutOfMemoryError minutes in, so it is refused before Spark starts.
MIN_DRIVER_MB = 1024


def memory_mb(text: str) -> int:
    """'4g' -> 4096, '512m' -> 512 (Spark's size suffixes k, m, g, t)."""
    n, unit = int(text[:-1]), text[-1].lower()
    return {"k": n // 1024, "m": n, "g": n * 1024, "t": n * 1024 * 1024}[unit]


def _physical_mb() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        return None


def _validate(cfg: Config, cfg_path: Path, check_paths: bool) -> None:
    """What the schema cannot say: bounds worded for people, cross-field rules, the machine's
    memory, and (check_paths) the files and directories the run needs."""
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{cfg_path}: {msg}")

    if not 0.0 <= cfg.ingest.reject_threshold <= 1.0:
        raise bad(f"ingest.reject_threshold must be within 0..1, got {cfg.ingest.reject_threshold}")
    if not cfg.spark.driver_memory[:-1].isdigit() or cfg.spark.driver_memory[-1].lower() not in "kmgt":
        raise bad(f"spark.driver_memory must look like 4g or 512m, got {cfg.spark.driver_memory!r}")
    mem_mb = memory_mb(cfg.spark.driver_memory)
    if mem_mb < MIN_DRIVER_MB:
        raise bad(f"spark.driver_memory {cfg.spark.driver_memory} is too little: the pipeline needs at least "
                  f"{MIN_DRIVER_MB // 1024}g (Spark, Delta and the ALS/GBT stages in one JVM); 4g or more is advised")
    total_mb = _physical_mb()
    if total_mb and mem_mb > total_mb:
        raise bad(f"spark.driver_memory {cfg.spark.driver_memory} is more than this machine's "
                  f"{total_mb / 1024:.0f} GiB of memory")
    if cfg.split.train_file and cfg.pipeline.mode != "evaluate":
        raise bad("split.train_file/test_file (--train/--test) give a held-out test part: they need "
                  "pipeline.mode evaluate (movierec evaluate)")
    if cfg.ingest.replace and cfg.ingest.incremental:
        raise bad("ingest.replace and ingest.incremental (--replace/--incremental) exclude each other: "
                  "replace makes the warehouse the input, incremental adds the input to it")
    if cfg.split.cutoff is not None:
        try:
            dt.datetime.fromisoformat(cfg.split.cutoff)
        except ValueError:
            raise bad(f"split.cutoff must be an ISO date or time such as 2018-01-01 or 2018-01-01T12:00:00, "
                      f"got {cfg.split.cutoff!r}") from None
    if "als" in cfg.hybrid.candidate_models and not cfg.als.top_n:
        raise bad("hybrid.candidate_models lists als but als.top_n is false: its lists would not exist")
    if not check_paths:
        return
    log4j = resolve_log4j(cfg.spark.log4j_config)
    if not log4j.is_file():
        raise bad(f"spark.log4j_config: file not found: {cfg.spark.log4j_config}")
    cfg.spark.log4j_config = str(log4j)
    if cfg.paths.input and not is_uri(cfg.paths.input):
        inp = Path(os.path.expanduser(cfg.paths.input))
        if not inp.exists():
            raise bad(f"paths.input: not found: {cfg.paths.input} (a MovieLens directory or .zip)")
        cfg.paths.input = str(inp.resolve())
    if bool(cfg.split.train_file) != bool(cfg.split.test_file):
        raise bad("split.train_file and split.test_file (--train/--test) go together")
    for key in ("train_file", "test_file"):
        val = getattr(cfg.split, key)
        if val:
            f = Path(os.path.expanduser(val))
            if not f.is_file():
                raise bad(f"split.{key}: not found: {val}")
            setattr(cfg.split, key, str(f.resolve()))
    if not is_uri(cfg.paths.warehouse):
        wh = Path(os.path.expanduser(cfg.paths.warehouse)).resolve()
        parent = next((p for p in [wh, *wh.parents] if p.exists()), None)
        if wh.exists() and not wh.is_dir():
            raise bad(f"paths.warehouse: {wh} exists and is not a directory")
        if parent is not None and not parent.is_dir():
            raise bad(f"paths.warehouse: cannot create {wh}: {parent} is a file, not a directory")
        if parent is None or not _can_write(parent):
            raise bad(f"paths.warehouse: cannot create or write {wh} (no write access to {parent})")
        cfg.paths.warehouse = str(wh)


def _can_write(directory: Path) -> bool:
    """Whether this process can create entries in `directory`: tried, not inferred from mode bits
    (root passes os.access on read-only mounts and on /proc)."""
    if not os.access(directory, os.W_OK):
        return False
    try:
        tempfile.TemporaryDirectory(dir=directory, prefix=".movierec-probe-").cleanup()
    except OSError:
        return False
    return True
