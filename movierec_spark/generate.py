"""Synthetic MovieLens ("ml-latest" layout) dataset generator.

The output is meant to stand in for the real MovieLens dump wherever the real
one is unavailable or too big, so the parts that downstream code and models
depend on are imitated on purpose:

* file layout and CSV dialect of ml-latest (unquoted headers, ``\\n`` line
  ends, titles quoted only when they contain a comma or a double quote, UTF-8);
* long-tailed movie popularity and user activity, users with >= 20 ratings
  when the requested density allows it;
* ratings that carry low-rank structure (user/movie factors and biases), so
  ALS-style models can beat baselines, and half stars only after Feb 2003 as
  in the real data;
* genres and tags correlated with the movie factors, so content models have
  signal.

Ratings are produced in blocks of users, each with its own random stream
derived from ``(seed, block index)``, and appended to ``ratings.csv`` so the
25M-rating configuration never holds all ratings in memory.  Output is a pure
function of the arguments (including ``chunk_users``).
"""

from __future__ import annotations

import csv
import logging
import operator
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

log = logging.getLogger(__name__)

__all__ = ["generate_dataset", "GENRES", "NO_GENRES"]

GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX",
    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRES = "(no genres listed)"

# Share of movies carrying each genre in ml-latest (25M release), used as the
# logistic intercepts so genre frequencies look familiar.
_GENRE_RATE = {
    "Action": 0.12, "Adventure": 0.066, "Animation": 0.047, "Children": 0.047,
    "Comedy": 0.27, "Crime": 0.085, "Documentary": 0.09, "Drama": 0.41,
    "Fantasy": 0.044, "Film-Noir": 0.006, "Horror": 0.096, "IMAX": 0.004,
    "Musical": 0.017, "Mystery": 0.047, "Romance": 0.124, "Sci-Fi": 0.058,
    "Thriller": 0.139, "War": 0.03, "Western": 0.022,
}
_NO_GENRE_SHARE = 0.04

# A tag vocabulary in the style of MovieLens tags.  One entry has a comma and
# one has double quotes because real tags do, and readers must cope.
_TAGS = (
    "atmospheric", "thought-provoking", "twist ending", "dark comedy", "funny",
    "visually appealing", "surreal", "psychology", "social commentary",
    "philosophical", "sci-fi", "based on a book", "great soundtrack", "quirky",
    "dystopia", "action", "cinematography", "space", "time travel", "comedy",
    "stylized", "classic", "violence", "romance", "nonlinear", "intelligent",
    "disturbing", "masterpiece", "suspense", "world war ii", "animation",
    "superhero", "predictable", "boring", "feel-good", "dark", "cult film",
    "satire", "black comedy", "historical", "true story", "biography",
    "musical", "horror", "zombies", "aliens", "artificial intelligence",
    "robots", "heist", "revenge", "crime", "mafia", "drugs", "police",
    "serial killer", "psychological thriller", "mystery", "magic",
    "fantasy world", "dragons", "fairy tale", "coming of age", "high school",
    "family", "kids", "friendship", "love story", "relationships",
    "bittersweet", "melancholy", "slow", "beautiful", "overrated",
    "underrated", "clever", "witty", "dialogue", "quotable", "adventure",
    "war", "western", "film noir", "surrealism", "documentary", "politics",
    "religion", "music", "dance", "sports", "boxing", "martial arts",
    "car chase", "explosions", "special effects", "cgi", "post-apocalyptic",
    "survival", "gore", "creepy", "vampires", "ghosts", "haunted house",
    "parody", "spoof", "remake", "sequel", "franchise", "oscar (best picture)",
    "imdb top 250", "slow burn", "heartwarming", "tearjerker", "epic",
    "mindbending", "cerebral", "road trip", "small town", "new york city",
    "los angeles", "paris", "dark, gritty", '"so bad it\'s good"',
)

_RATING_LABELS = pa.array(
    ["0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "4.5", "5.0"]
)

_T_START = 820_454_400  # 1996-01-01T00:00:00Z
_T_END = 1_703_980_799  # 2023-12-30T23:59:59Z
_HALF_STARS_FROM = 1_045_526_400  # 2003-02-18, MovieLens started half stars

# Rating model, tuned so the clipped, rounded ratings match ml-latest:
# mean ~3.53, sd ~1.03 and a similar histogram.  Latent score sd is ~1.08;
# _MU sits above 3.5 because clipping at 5.0 pulls the mean down.
_MU = 3.62
_USER_BIAS_SD = 0.45
_MOVIE_BIAS_SD = 0.45
_POP_BIAS = 0.12  # popular movies are rated higher, as in the real data
_INTERACTION_SD = 0.55
_NOISE_SD = 0.65
_NOISE_SKEW = 0.8
_HALF_STAR_USERS = 0.85  # share of post-2003 users who use half stars at all

# Popularity: Zipf-Mandelbrot weights (rank + offset)^-exponent.  The offset
# flattens the head; it is solved per dataset so a user of average activity
# rates the most popular movie with probability _TOP_MOVIE_REACH (in
# ml-latest Forrest Gump is rated by ~50% of users).  A fixed offset makes
# small catalogues degenerate: every user would rate the same top movies.
_POP_EXPONENT = 2.5
_TOP_MOVIE_REACH = 0.65
_USER_ACTIVITY_SIGMA = 1.35  # lognormal; ml-latest median 71, mean 153
_USER_MIN_RATINGS = 20

_GENRE_STRENGTH = 2.0
_TAG_STRENGTH = 2.5
_TAGGER_SHARE = 0.08  # ml-latest: ~9% of users ever tag
_TAGS_PER_RATING_CAP = 3
_DEFAULT_TAGS_PER_RATING = 0.04  # ml-latest 25M: 1.09M tags / 25M ratings

# SeedSequence stream ids, so every component has an independent stream and
# adding a component never shifts another's random numbers.
_S_MOVIES, _S_USERS, _S_TAGS, _S_BLOCK, _S_LINKS = range(5)


def generate_dataset(
    out: str | os.PathLike,
    users: int,
    movies: int,
    ratings: int,
    seed: int = 42,
    tags: int | None = None,
    rank: int = 8,
    chunk_users: int = 4096,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic ml-latest style CSV directory to ``out``.

    Files: ``ratings.csv``, ``movies.csv``, ``tags.csv``, ``links.csv``.
    Exactly ``ratings`` ratings and ``tags`` tags are written (``tags``
    defaults to 4% of ``ratings``, the ml-latest ratio); every user has at
    least one rating.  Files are written under temporary names and renamed at
    the end, so an interrupted run never leaves a ``ratings.csv`` behind.

    Returns ``{"users", "movies", "ratings", "tags"}`` counts.
    """
    users = _positive_int("users", users)
    movies = _positive_int("movies", movies)
    ratings = _positive_int("ratings", ratings)
    rank = _positive_int("rank", rank)
    chunk_users = _positive_int("chunk_users", chunk_users)
    seed = operator.index(seed)
    if ratings > users * movies:
        raise ValueError(
            f"ratings={ratings} exceeds users*movies={users * movies}: "
            "each (userId, movieId) pair can be rated at most once"
        )
    if ratings < users:
        raise ValueError(
            f"ratings={ratings} is less than users={users}: "
            "every user must have at least one rating"
        )
    if tags is None:
        tags = int(round(ratings * _DEFAULT_TAGS_PER_RATING))
    tags = operator.index(tags)
    if tags < 0:
        raise ValueError(f"tags must be >= 0, got {tags}")
    if tags > _TAGS_PER_RATING_CAP * ratings:
        raise ValueError(
            f"tags={tags} exceeds {_TAGS_PER_RATING_CAP} tags per rating "
            f"({_TAGS_PER_RATING_CAP * ratings})"
        )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ratings.csv").exists() and not overwrite:
        raise FileExistsError(
            f"{out} already contains ratings.csv; pass overwrite=True to replace it"
        )

    catalog = _make_movies(seed, movies, rank, ratings / users)
    n_per_user = _user_counts(seed, users, movies, ratings)
    tags_per_user = _tag_counts(seed, n_per_user, tags)
    sampler = _Sampler(catalog["pop"])
    # Popular movies carry higher biases, so the rating-weighted mean bias
    # depends on how concentrated sampling is at this size; centre it under
    # the inclusion probabilities of an average user to keep the global
    # mean near _MU at every scale.
    incl = sampler.inclusion(ratings / users)
    catalog["bias"] -= (incl * catalog["bias"]).sum() / incl.sum()

    names = ("ratings.csv", "movies.csv", "tags.csv", "links.csv")
    tmp = {name: out / f".{name}.partial" for name in names}

    _write_movies(tmp["movies.csv"], catalog)
    _write_links(tmp["links.csv"], seed, movies)

    log.info(
        "generating %d ratings for %d users x %d movies into %s (seed=%d)",
        ratings, users, movies, out, seed,
    )
    written = tag_rows = 0
    next_decile = 1
    with open(tmp["ratings.csv"], "wb") as rf, open(
        tmp["tags.csv"], "w", newline="", encoding="utf-8"
    ) as tf:
        rf.write(b"userId,movieId,rating,timestamp\n")
        tag_writer = csv.writer(tf, lineterminator="\n")
        tag_writer.writerow(["userId", "movieId", "tag", "timestamp"])
        with pacsv.CSVWriter(
            rf,
            _RATINGS_SCHEMA,
            write_options=pacsv.WriteOptions(include_header=False, quoting_style="none"),
        ) as writer:
            for block, lo in enumerate(range(0, users, chunk_users)):
                hi = min(users, lo + chunk_users)
                rng = np.random.default_rng(
                    np.random.SeedSequence([seed, _S_BLOCK, block])
                )
                table, tag_rows_block = _generate_block(
                    rng, lo, hi, users, n_per_user[lo:hi],
                    tags_per_user[lo:hi], catalog, sampler,
                )
                writer.write_table(table)
                tag_writer.writerows(tag_rows_block)
                written += table.num_rows
                tag_rows += len(tag_rows_block)
                if hi * 10 >= next_decile * users:
                    log.info(
                        "%3d%% users (%d/%d), %d ratings written",
                        hi * 100 // users, hi, users, written,
                    )
                    next_decile = hi * 10 // users + 1

    # Guard the exact-count contract explicitly: a silent miscount here would
    # surface much later as a puzzling mismatch in a Spark job.
    if written != ratings or tag_rows != tags:
        raise RuntimeError(
            f"internal error: wrote {written} ratings / {tag_rows} tags, "
            f"expected {ratings} / {tags}"
        )
    for name in names:
        os.replace(tmp[name], out / name)
    return {"users": users, "movies": movies, "ratings": ratings, "tags": tags}


def _positive_int(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _allocate(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights``, each <= ``caps``, summing to ``total``.

    Water-filling for the caps, then largest remainders for the rounding, so
    the sum is exact (the caller asked for R ratings and must get R).
    """
    caps = caps.astype(np.int64)
    if total > caps.sum():
        raise ValueError("allocation infeasible")  # guarded by callers
    w = np.asarray(weights, dtype=np.float64)
    x = np.zeros(len(w))
    free = caps > 0
    while True:
        remaining = total - x.sum()
        wsum = w[free].sum()
        if remaining <= 0 or wsum <= 0:
            break
        share = np.where(free, remaining * w / wsum, 0.0)
        over = free & (x + share >= caps)
        if not over.any():
            x += share
            break
        x[over] = caps[over]
        free &= ~over
    base = np.minimum(np.floor(x).astype(np.int64), caps)
    short = total - int(base.sum())
    frac = x - base
    # Float round-off can leave `short` off by a few units in either direction;
    # walk the largest remainders among users with room until exact.
    while short != 0:
        if short > 0:
            room = np.flatnonzero(base < caps)
            pick = room[np.argsort(-frac[room], kind="stable")[:short]]
            base[pick] += 1
            frac[pick] = -1.0
        else:
            room = np.flatnonzero(base > 0)
            pick = room[np.argsort(frac[room], kind="stable")[:-short]]
            base[pick] -= 1
            frac[pick] = 2.0
        short = total - int(base.sum())
    return base


def _user_counts(seed: int, users: int, movies: int, ratings: int) -> np.ndarray:
    rng = _rng(seed, _S_USERS)
    floor = max(1, min(_USER_MIN_RATINGS, ratings // users // 3, movies))
    weights = rng.lognormal(0.0, _USER_ACTIVITY_SIGMA, users)
    extra = _allocate(
        ratings - floor * users, weights, np.full(users, movies - floor)
    )
    return extra + floor


def _tag_counts(seed: int, n_per_user: np.ndarray, tags: int) -> np.ndarray:
    rng = _rng(seed, _S_TAGS)
    users = len(n_per_user)
    # Few users tag, and taggers are heavy-tailed; non-taggers get a tiny
    # weight so water-filling can still place tags when taggers hit the cap.
    is_tagger = rng.random(users) < _TAGGER_SHARE
    weights = np.where(is_tagger, rng.lognormal(0.0, 1.5, users), 1e-6)
    weights *= np.sqrt(n_per_user)
    return _allocate(tags, weights, _TAGS_PER_RATING_CAP * n_per_user)


def _make_movies(seed: int, movies: int, rank: int, mean_activity: float) -> dict:
    rng = _rng(seed, _S_MOVIES)
    # Movie factors are standard normal so unit projections of them are
    # standard normal too (used for genres and tags); user factors carry the
    # scale that makes x . y have sd _INTERACTION_SD whatever the rank.
    y = rng.standard_normal((movies, rank))
    pop = rng.permutation(_popularity(movies, mean_activity))
    log_pop = np.log(pop)
    bias = rng.normal(0.0, _MOVIE_BIAS_SD, movies)
    if log_pop.std() > 0:
        bias += _POP_BIAS * (log_pop - log_pop.mean()) / log_pop.std()

    # Genre g is present with probability sigmoid(intercept_g + k * a_g . y);
    # unit a_g keeps the projection standard normal whatever the rank.
    directions = rng.standard_normal((len(GENRES), rank))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    intercept = _genre_intercepts(_GENRE_STRENGTH)
    logits = intercept + _GENRE_STRENGTH * (y @ directions.T)
    has = rng.random(logits.shape) < 1.0 / (1.0 + np.exp(-logits))
    # Movies that drew no genre get one drawn in proportion to their genre
    # probabilities (Gumbel-max); a plain argmax would pile them onto Drama.
    empty = ~has.any(axis=1)
    log_p = -np.logaddexp(0.0, -logits[empty])
    has[empty, np.argmax(log_p + rng.gumbel(size=log_p.shape), axis=1)] = True
    no_genre = rng.random(movies) < _NO_GENRE_SHARE
    has[no_genre] = False

    years = np.clip(2023 - np.floor(rng.exponential(18.0, movies)), 1902, 2023)
    style = rng.random(movies)
    return {
        "y": y,
        "user_scale": _INTERACTION_SD / np.sqrt(rank),
        "bias": bias,
        "pop": pop,
        "genres": has,
        "years": years.astype(np.int64),
        "style": style,
        "tag_dirs": _tag_directions(rng, rank),
        "tag_base": np.log(1.0 / (rng.permutation(len(_TAGS)) + 3.0)),
    }


def _popularity(movies: int, mean_activity: float) -> np.ndarray:
    """Zipf-Mandelbrot probabilities by popularity rank (most popular first)."""
    ranks = np.arange(movies, dtype=np.float64)

    def probs(offset: float) -> np.ndarray:
        w = (ranks + offset) ** -_POP_EXPONENT
        return w / w.sum()

    def top_reach(offset: float) -> float:
        log_q = np.log1p(-np.minimum(probs(offset), 1 - 1e-12))
        expected = lambda n: -np.expm1(n * log_q).sum()  # noqa: E731
        lo, hi = mean_activity, mean_activity
        while expected(hi) < mean_activity:
            hi *= 2
            if hi > 1e4 * movies:
                return 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected(mid) < mean_activity else (lo, mid)
        return -np.expm1(hi * log_q[0])

    # Reach falls as the offset grows (flatter head); bisect on log offset.
    lo, hi = 0.0, np.log(max(movies, 2.0))
    if top_reach(1.0) <= _TOP_MOVIE_REACH:
        return probs(1.0)
    for _ in range(25):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if top_reach(np.exp(mid)) > _TOP_MOVIE_REACH else (lo, mid)
    return probs(np.exp(hi))


def _genre_intercepts(strength: float) -> np.ndarray:
    """Intercepts c_g with E[sigmoid(c_g + strength * Z)] = ml-latest share.

    The plain logit of the share would inflate rare genres a lot once the
    slope is strong (IMAX at 2%+ instead of 0.4%), so solve for c_g by
    bisection against Gauss-Hermite quadrature of the standard normal.
    """
    target = np.array([_GENRE_RATE[g] for g in GENRES]) / (1 - _NO_GENRE_SHARE)
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    weights = weights / weights.sum()
    lo = np.full(len(GENRES), -30.0)
    hi = np.full(len(GENRES), 30.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        rate = (weights / (1 + np.exp(-(mid[:, None] + strength * nodes)))).sum(1)
        too_high = rate > target
        hi = np.where(too_high, mid, hi)
        lo = np.where(too_high, lo, mid)
    return (lo + hi) / 2


def _tag_directions(rng: np.random.Generator, rank: int) -> np.ndarray:
    d = rng.standard_normal((len(_TAGS), rank))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _title(movie_id: int, year: int, style: float) -> str:
    # Shares mimic the oddities of real titles that break naive parsers:
    # trailing articles (commas), alternate titles in parentheses (so the
    # year is the *last* parenthesised group), non-ASCII, embedded quotes.
    if style < 0.06:
        return f"Synthetic Movie {movie_id}, The ({year})"
    if style < 0.08:
        return f"Synthetic Movie {movie_id}, A ({year})"
    if style < 0.10:
        return f"Synthetic Movie {movie_id} (Film Synthétique {movie_id}) ({year})"
    if style < 0.105:
        return f'"Synthetic Movie {movie_id}" Special ({year})'
    return f"Synthetic Movie {movie_id} ({year})"


def _write_movies(path: Path, catalog: dict) -> None:
    genres = np.array(GENRES)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["movieId", "title", "genres"])
        for i, (has, year, style) in enumerate(
            zip(catalog["genres"], catalog["years"].tolist(), catalog["style"].tolist())
        ):
            g = "|".join(genres[has]) if has.any() else NO_GENRES
            w.writerow([i + 1, _title(i + 1, year, style), g])


def _write_links(path: Path, seed: int, movies: int) -> None:
    rng = _rng(seed, _S_LINKS)
    imdb = np.sort(rng.choice(9_999_999, movies, replace=False) + 1)
    tmdb = rng.choice(999_999, movies, replace=False) + 1
    missing = rng.random(movies) < 0.002  # ml-latest has a few without tmdbId
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write("movieId,imdbId,tmdbId\n")
        f.writelines(
            f"{i + 1},{im:07d},{'' if miss else tm}\n"
            for i, (im, tm, miss) in enumerate(
                zip(imdb.tolist(), tmdb.tolist(), missing.tolist())
            )
        )


class _Sampler:
    """Draws distinct movies per user, weighted by popularity, without replacement.

    For most users it draws with replacement from the popularity CDF and keeps
    the first n distinct movies, which is exactly successive sampling without
    replacement.  The number of draws needed for n distinct comes from the
    expected-distinct curve E(N) = sum_j 1 - (1 - p_j)^N, so one vectorized
    pass over a whole block almost always suffices.  Heavy users (who would
    need more than half a catalogue of draws) and the rare user who falls
    short use Efraimidis-Spirakis keys over the whole catalogue instead.
    """

    def __init__(self, pop: np.ndarray):
        self.m = len(pop)
        self.pop = pop
        self.cdf = np.cumsum(pop)
        self.cdf /= self.cdf[-1]
        grid = np.unique(np.geomspace(1, max(2, self.m), 160).round())
        log_q = np.log1p(-np.minimum(pop, 1 - 1e-12))
        self.grid = grid
        self.expected = np.array([-np.expm1(n * log_q).sum() for n in grid])

    def inclusion(self, n: float) -> np.ndarray:
        """Approximate per-movie inclusion probability for a user with n ratings."""
        draws = np.interp(n, self.expected, self.grid)
        return -np.expm1(draws * np.log1p(-np.minimum(self.pop, 1 - 1e-12)))

    def draws_needed(self, n: np.ndarray) -> np.ndarray:
        target = n + 3.0 * np.sqrt(n) + 2.0
        need = np.interp(target, self.expected, self.grid, right=np.inf)
        return np.ceil(need * 1.05)

    def sample(self, rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
        """Return sorted keys ``local_user * m + movie_index`` (0-based)."""
        m = self.m
        need = self.draws_needed(counts.astype(np.float64))
        heavy = need > m / 2
        stream_users = np.flatnonzero(~heavy)
        parts = []
        if len(stream_users):
            need_s = need[stream_users].astype(np.int64)
            owner = np.repeat(stream_users, need_s)
            movie = np.searchsorted(self.cdf, rng.random(len(owner)), side="right")
            np.minimum(movie, m - 1, out=movie)
            keys = owner * m + movie
            pos, short = _first_distinct(owner, keys, counts, len(counts))
            parts.append(keys[pos])
            heavy |= short
        for u in np.flatnonzero(heavy):
            # Exponential-key trick: the n smallest E_j / p_j are a weighted
            # sample without replacement with the same law as above.
            k = rng.standard_exponential(m) / self.pop
            chosen = np.argpartition(k, counts[u] - 1)[: counts[u]]
            parts.append(u * m + chosen)
        return np.sort(np.concatenate(parts))


def _first_distinct(
    owner: np.ndarray, keys: np.ndarray, quota: np.ndarray, n_owner: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stream positions of the first ``quota[o]`` distinct keys of each owner.

    ``owner`` must be non-decreasing along the stream and ``keys`` must embed
    the owner.  Owners with fewer distinct keys than their quota are returned
    in the ``short`` mask and contribute no positions.
    """
    order = np.argsort(keys)
    sk = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
    # The unstable sort scrambles equal keys, so take the minimum position in
    # each run to recover the first occurrence.
    pos = np.sort(np.minimum.reduceat(order, starts))
    own = owner[pos]
    distinct = np.bincount(own, minlength=n_owner)
    first_of_owner = np.cumsum(distinct) - distinct
    rank_in_owner = np.arange(len(pos)) - first_of_owner[own]
    short = distinct < quota
    keep = (rank_in_owner < quota[own]) & ~short[own]
    return pos[keep], short


_RATINGS_SCHEMA = pa.schema(
    [
        ("userId", pa.int64()),
        ("movieId", pa.int64()),
        ("rating", pa.string()),
        ("timestamp", pa.int64()),
    ]
)


def _generate_block(
    rng: np.random.Generator,
    lo: int,
    hi: int,
    users: int,
    counts: np.ndarray,
    tag_counts: np.ndarray,
    catalog: dict,
    sampler: _Sampler,
) -> tuple[pa.Table, list]:
    n_users = hi - lo
    m = sampler.m
    keys = sampler.sample(rng, counts)
    lu = keys // m
    mv = keys - lu * m
    n = len(keys)

    y = catalog["y"]
    rank = y.shape[1]
    x = rng.standard_normal((n_users, rank)) * catalog["user_scale"]
    b_user = rng.normal(0.0, _USER_BIAS_SD, n_users)
    noise_user = _NOISE_SD * rng.lognormal(0.0, 0.25, n_users)
    uses_half = rng.random(n_users) < _HALF_STAR_USERS

    score = np.einsum("ij,ij->i", x[lu], y[mv])
    score += _MU + b_user[lu] + catalog["bias"][mv]
    # Unit-variance noise with a left skew: MovieLens has a longer tail of
    # pans (0.5-1.5 stars) than a symmetric model produces.
    eps = np.sqrt(1 - _NOISE_SKEW**2) * rng.standard_normal(n)
    eps -= _NOISE_SKEW * (rng.standard_exponential(n) - 1.0)
    score += eps * noise_user[lu]

    # userIds follow sign-up order, so time increases with userId overall;
    # each user rates within a lognormal window (median ~2 weeks; many
    # MovieLens users rate everything in one sitting, some for years).
    t0 = _T_START + (np.arange(lo, hi) + rng.random(n_users)) / users * (
        _T_END - _T_START
    )
    span = np.minimum(
        rng.lognormal(np.log(14 * 86400.0), 2.5, n_users), _T_END - t0
    )
    ts = (t0[lu] + rng.random(n) * span[lu]).astype(np.int64)

    half = uses_half[lu] & (ts >= _HALF_STARS_FROM)
    stars = np.where(
        half,
        np.clip(np.rint(score * 2.0), 1, 10),
        np.clip(np.rint(score), 1, 5) * 2.0,
    ).astype(np.int64)  # in half-star units, 1..10
    table = pa.table(
        [
            pa.array(lu + lo + 1),
            pa.array(mv + 1),
            _RATING_LABELS.take(pa.array(stars - 1)),
            pa.array(ts),
        ],
        schema=_RATINGS_SCHEMA,
    )

    tag_rows = _generate_tags(rng, tag_counts, counts, lu, mv, ts, lo, catalog)
    return table, tag_rows


def _generate_tags(rng, tag_counts, counts, lu, mv, ts, lo, catalog) -> list:
    """Tag rows for a block: (userId, movieId, tag, timestamp) tuples.

    A tag is applied to one of the user's rated movies and drawn with
    log-probability base_t + k * d_t . y_movie, so tags point in factor
    directions.  (movie, tag) pairs are distinct per user; like for movies,
    draw with replacement and keep the first distinct ones.
    """
    taggers = np.flatnonzero(tag_counts)
    if len(taggers) == 0:
        return []
    v = len(_TAGS)
    row_start = np.cumsum(counts) - counts
    quota = tag_counts.astype(np.int64)

    def tag_logits(rows: np.ndarray) -> np.ndarray:
        return catalog["tag_base"] + _TAG_STRENGTH * (
            catalog["y"][mv[rows]] @ catalog["tag_dirs"].T
        )

    chosen = []
    pending = taggers
    enumerate_all = []
    factor = 1.3
    for _ in range(4):
        need = np.ceil(quota[pending] * factor + 4).astype(np.int64)
        # Past one draw per rated movie, enumerating every (movie, tag) pair
        # of the user is cheaper than drawing, and it always succeeds.
        dense = need > counts[pending]
        enumerate_all.extend(pending[dense].tolist())
        pending, need = pending[~dense], need[~dense]
        if len(pending) == 0:
            break
        owner = np.repeat(pending, need)
        row = row_start[owner] + (rng.random(len(owner)) * counts[owner]).astype(np.int64)
        logits = tag_logits(row)
        tag = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
        # A block-wide row index identifies the user, so row * v + tag embeds
        # the owner as _first_distinct requires.
        keys = row * v + tag
        pos, short = _first_distinct(owner, keys, quota, len(quota))
        chosen.append(keys[pos])
        pending = pending[short[pending]]
        factor *= 2
    enumerate_all.extend(pending.tolist())
    for u in sorted(enumerate_all):
        rows = np.arange(row_start[u], row_start[u] + counts[u])
        logits = tag_logits(rows)
        # Exponential keys E / p: the quota smallest are a weighted sample
        # without replacement, the same law as the draw-and-dedup path.
        k = rng.standard_exponential(logits.size) / np.exp(logits - logits.max()).ravel()
        pick = np.argpartition(k, quota[u] - 1)[: quota[u]]
        chosen.append(rows[pick // v] * v + pick % v)

    keys = np.sort(np.concatenate(chosen))
    row, tag = np.divmod(keys, v)
    tag_ts = ts[row] + rng.integers(0, 3600, len(row))
    names = np.array(_TAGS, dtype=object)
    return list(
        zip(
            (lu[row] + lo + 1).tolist(),
            (mv[row] + 1).tolist(),
            names[tag].tolist(),
            tag_ts.tolist(),
        )
    )
