"""Tests for the synthetic MovieLens generator (pure numpy/pandas, no Spark).

The assertions target the statistical shape that downstream models rely on,
so each would fail if the corresponding part of the generator regressed to
something naive (uniform popularity, uniform activity, pure-noise ratings...).
"""

from __future__ import annotations

import csv
import logging
import re

import numpy as np
import pandas as pd
import pytest

from movierec_spark.generate import GENRES, NO_GENRES, generate_dataset

USERS, MOVIES, RATINGS, SEED = 400, 2000, 20_000, 7
FILES = ("ratings.csv", "movies.csv", "tags.csv", "links.csv")
HALF_STARS = {x / 2 for x in range(1, 11)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "ml"
    counts = generate_dataset(out, USERS, MOVIES, RATINGS, seed=SEED)
    return {
        "dir": out,
        "counts": counts,
        "ratings": pd.read_csv(out / "ratings.csv"),
        "movies": pd.read_csv(out / "movies.csv"),
        "tags": pd.read_csv(out / "tags.csv", keep_default_na=False),
    }


def _gini(x: np.ndarray) -> float:
    x = np.sort(np.asarray(x, dtype=float))
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def test_exact_counts_and_headers(dataset):
    d = dataset["dir"]
    assert dataset["counts"] == {
        "users": USERS,
        "movies": MOVIES,
        "ratings": RATINGS,
        "tags": len(dataset["tags"]),
    }
    assert len(dataset["ratings"]) == RATINGS
    assert len(dataset["movies"]) == MOVIES
    headers = {name: (d / name).read_text(encoding="utf-8").split("\n", 1)[0] for name in FILES}
    assert headers == {
        "ratings.csv": "userId,movieId,rating,timestamp",
        "movies.csv": "movieId,title,genres",
        "tags.csv": "userId,movieId,tag,timestamp",
        "links.csv": "movieId,imdbId,tmdbId",
    }
    # No temporary files may survive a successful run.
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)


def test_exact_count_for_awkward_sizes(tmp_path):
    # Sizes where proportional allocation cannot divide evenly and where some
    # users must rate nearly the whole catalogue.
    counts = generate_dataset(tmp_path, users=37, movies=41, ratings=1499, seed=3, tags=101)
    r = pd.read_csv(tmp_path / "ratings.csv")
    t = pd.read_csv(tmp_path / "tags.csv", keep_default_na=False)
    assert counts["ratings"] == len(r) == 1499
    assert counts["tags"] == len(t) == 101
    assert not r.duplicated(["userId", "movieId"]).any()
    assert r.userId.nunique() == 37


def test_ids_unique_pairs_and_referential_integrity(dataset):
    r, m = dataset["ratings"], dataset["movies"]
    assert not r.duplicated(["userId", "movieId"]).any()
    assert r.userId.min() == 1 and r.userId.max() == USERS
    assert r.userId.nunique() == USERS  # every user has at least one rating
    assert m.movieId.tolist() == list(range(1, MOVIES + 1))
    assert r.movieId.isin(m.movieId).all()
    # ml-latest ordering: by userId, then movieId.
    assert r.sort_values(["userId", "movieId"]).index.equals(r.index)


def test_rating_scale_and_moments(dataset):
    r = dataset["ratings"]
    assert set(r.rating.unique()) <= HALF_STARS
    assert 3.2 <= r.rating.mean() <= 3.8
    assert 0.8 <= r.rating.std() <= 1.2
    # The raw file must use ml-latest's one-decimal format ("4.0", not "4").
    first = (dataset["dir"] / "ratings.csv").read_text().split("\n")[1]
    assert re.fullmatch(r"\d+,\d+,[0-5]\.[05],\d+", first)


def test_half_stars_only_after_feb_2003(dataset):
    r = dataset["ratings"]
    early = r[r.timestamp < 1_045_526_400]
    assert len(early) > 0
    assert (early.rating % 1 == 0).all()
    assert (r.rating % 1 != 0).any()


def test_movie_popularity_is_long_tailed(dataset):
    counts = (
        dataset["ratings"].movieId.value_counts().reindex(range(1, MOVIES + 1), fill_value=0)
    )
    top = np.sort(counts.values)[::-1]
    assert top[: MOVIES // 10].sum() / RATINGS > 0.4
    assert _gini(counts.values) > 0.6
    assert np.median(counts.values) < counts.mean() / 2
    # The head must not be degenerate: nobody's top movie is rated by all.
    assert top[0] < USERS


def test_user_activity_is_skewed(dataset):
    per_user = dataset["ratings"].userId.value_counts()
    assert per_user.max() > 5 * per_user.median()
    assert per_user.min() >= 5
    assert _gini(per_user.values) > 0.35


def test_timestamps_in_range_and_increasing_with_user(dataset):
    r = dataset["ratings"]
    assert r.timestamp.min() >= 820_454_400  # 1996-01-01
    assert r.timestamp.max() < 1_704_067_200  # 2024-01-01
    first_seen = r.groupby("userId").timestamp.min()
    assert np.corrcoef(first_seen.index, first_seen.values)[0, 1] > 0.9


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path):
    def files(d):
        return {name: (d / name).read_bytes() for name in FILES}

    args = dict(users=120, movies=300, ratings=5000, chunk_users=50)
    generate_dataset(tmp_path / "a", seed=11, **args)
    generate_dataset(tmp_path / "b", seed=11, **args)
    generate_dataset(tmp_path / "c", seed=12, **args)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    for name in FILES:
        assert a[name] != c[name], name


def _user_genre_split_corr(ratings, genre_matrix, seed=0, min_n=3):
    """Correlation of a user's per-genre mean residual across two random halves.

    Only user x genre taste can make the two halves agree: user means are
    removed within each half, and per-genre movie bias averages out.
    """
    half = np.random.default_rng(seed).random(len(ratings)) < 0.5
    stats = []
    for part in (ratings[half], ratings[~half]):
        res = part.rating - part.groupby("userId").rating.transform("mean")
        g = genre_matrix.loc[part.movieId].to_numpy(dtype=float)
        sums = pd.DataFrame(g * res.to_numpy()[:, None]).groupby(part.userId.to_numpy()).sum()
        cnts = pd.DataFrame(g).groupby(part.userId.to_numpy()).sum()
        stats.append((sums.stack(), cnts.stack()))
    (s1, c1), (s2, c2) = stats
    df = pd.concat({"s1": s1, "c1": c1, "s2": s2, "c2": c2}, axis=1).dropna()
    df = df[(df.c1 >= min_n) & (df.c2 >= min_n)]
    assert len(df) > 500  # enough pairs for the correlation to mean something
    return np.corrcoef(df.s1 / df.c1, df.s2 / df.c2)[0, 1]


def test_ratings_carry_user_genre_taste(dataset):
    m = dataset["movies"]
    genres = m.genres.str.get_dummies("|").drop(columns=NO_GENRES, errors="ignore")
    genres.index = m.movieId
    real = _user_genre_split_corr(dataset["ratings"], genres)
    # Same statistic with genres shuffled across movies is the null.
    shuffled = genres.sample(frac=1.0, random_state=0).set_axis(genres.index)
    null = _user_genre_split_corr(dataset["ratings"], shuffled)
    assert real > 0.1
    assert real > null + 0.08


def test_movies_csv_quoting_titles_and_genres(dataset):
    with open(dataset["dir"] / "movies.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == MOVIES
    assert all(len(row) == 3 for row in rows)
    titles = [row[1] for row in rows]
    assert any("," in t for t in titles)
    assert any('"' in t for t in titles)
    assert all(re.search(r"\((\d{4})\)$", t) for t in titles)
    years = [int(re.search(r"\((\d{4})\)$", t).group(1)) for t in titles]
    assert min(years) >= 1900 and max(years) <= 2023
    # Commas only ever appear inside quoted fields.
    raw = (dataset["dir"] / "movies.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert all(('"' in line) for line in raw if line.count(",") > 2)

    allowed = set(GENRES)
    genre_lists = [row[2] for row in rows]
    no_genre = sum(g == NO_GENRES for g in genre_lists)
    assert 0 < no_genre < 0.1 * MOVIES
    for g in genre_lists:
        if g != NO_GENRES:
            parts = g.split("|")
            assert set(parts) <= allowed and parts == sorted(parts)
    drama = np.mean(["Drama" in g.split("|") for g in genre_lists])
    imax = np.mean(["IMAX" in g.split("|") for g in genre_lists])
    assert drama > 0.25 and imax < 0.03  # ml-latest-like genre frequencies


def test_tags_and_links(dataset):
    t, r = dataset["tags"], dataset["ratings"]
    assert len(t) == round(0.04 * RATINGS)
    assert not t.duplicated(["userId", "movieId", "tag"]).any()
    # Users tag movies they rated, and not before rating them.
    merged = t.merge(r, on=["userId", "movieId"], suffixes=("_tag", "_rating"))
    assert len(merged) == len(t)
    assert (merged.timestamp_tag >= merged.timestamp_rating).all()
    assert t.userId.nunique() < USERS / 2  # few users tag
    assert (t.tag.str.len() > 0).all()

    links = pd.read_csv(dataset["dir"] / "links.csv", dtype=str, keep_default_na=False)
    assert links.movieId.astype(int).tolist() == list(range(1, MOVIES + 1))
    assert links.imdbId.str.fullmatch(r"\d{7}").all()
    assert links.imdbId.is_unique


def test_refuses_existing_ratings_unless_overwrite(tmp_path):
    args = dict(users=10, movies=20, ratings=100)
    generate_dataset(tmp_path, seed=1, **args)
    before = (tmp_path / "ratings.csv").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_dataset(tmp_path, seed=2, **args)
    assert (tmp_path / "ratings.csv").read_bytes() == before
    generate_dataset(tmp_path, seed=2, overwrite=True, **args)
    assert (tmp_path / "ratings.csv").read_bytes() != before


def test_creates_missing_output_dir(tmp_path):
    out = tmp_path / "a" / "b"
    generate_dataset(out, users=5, movies=5, ratings=10)
    assert (out / "ratings.csv").is_file()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(users=0, movies=10, ratings=5), "users"),
        (dict(users=5, movies=-1, ratings=5), "movies"),
        (dict(users=5, movies=10, ratings=0), "ratings"),
        (dict(users=5, movies=10, ratings=51), "exceeds users\\*movies"),
        (dict(users=5, movies=10, ratings=4), "at least one rating"),
        (dict(users=5, movies=10, ratings=20, tags=-1), "tags"),
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "ratings.csv").exists()


def test_logs_progress(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="movierec_spark.generate"):
        generate_dataset(tmp_path, users=100, movies=50, ratings=1000, chunk_users=10)
    progress = [r for r in caplog.records if "users (" in r.getMessage()]
    assert 5 <= len(progress) <= 11
    assert "100% users" in progress[-1].getMessage()
