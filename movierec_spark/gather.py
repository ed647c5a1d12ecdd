"""The neighbour-rating features (sur, smr, csmr and their kNN baselines) gathered in numpy.

For a pair (user u, movie m) and a neighbour list of m (movies) the features read u's ratings
of m's neighbours; for a list of u (users), the neighbours' ratings of m. As a Spark join that
is pairs x list-length rows (30 per pair for sur and smr, 20 for csmr), shuffled twice and
grouped: most of the features stage's shuffle. Here the ratings and the pairs are partitioned
by the column the lookups share (`by`: the user for movie lists, the movie for user lists), each
partition gets a copy of the lists (partitioned.py), and a pair's neighbours are looked up in
its partition's sorted ratings with one searchsorted per chunk of pairs.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .partitioned import movies_then_users, numpy_partitions

# How many pairs one numpy step takes (each a row of list-length lookups).
CHUNK = 65536
# How many ratings of the list's neighbours each set keeps per pair (the features' 1..5).
TOP = 5


def schema(names: list[str]) -> str:
    cols = ["userId int", "movieId int"]
    for p in names:
        cols += [f"{p}{i + 1} double" for i in range(TOP)] + [f"n_{p} int", f"{p}_knn double", f"{p}_cnt long",
                                                              f"{p}_near double"]
    return ", ".join(cols)


def neighbour_ratings(keys: DataFrame, resid: DataFrame, lists: list[DataFrame], by: str, names: list[str],
                      shrinks: list[float]) -> DataFrame:
    """Per pair of `keys` (userId, movieId; distinct) and per neighbour list set `lists[i]`
    (via, nb, sim[, near]: via the key column other than `by`, each via value's neighbours nb
    with their similarity; `near` False: used by the kNN sums only, not the top ratings), the
    ratings in `resid` (userId, movieId, r, res: one row per pair) of the pair's `by` value
    with the pair's via value replaced by each neighbour:

    - {name}1..{name}5: the `r` of the hits among near neighbours, by similarity (descending)
      then rating (ascending), null past the last; n_{name}: how many of them (at most 5);
    - {name}_knn: sum(sim x res) / (sum(sim) + shrinks[i]) over every hit; {name}_cnt: hits;
    - {name}_near: the summed sim of the near hits (null without one).

    A pair with no hit in any set is left out; a set without hits in a kept row has nulls and
    0 counts. The same values as the join in features._top_ratings (up to the order of a sum).
    """
    via = "movieId" if by == "userId" else "userId"
    spark = keys.sparkSession
    parts = numpy_partitions(spark)
    pid = F.pmod(F.xxhash64(by), F.lit(parts)).cast("int")
    list_rows = None
    for i, lst in enumerate(lists):
        near = F.col("near") if "near" in lst.columns else F.lit(True)
        rows = lst.select(F.lit(i).alias("s"), F.col(via).cast("int").alias("a"), F.col("nb").cast("int").alias("b"),
                          F.col("sim").cast("double").alias("x"), near.cast("double").alias("y"))
        list_rows = rows if list_rows is None else list_rows.unionByName(rows)
    rated = resid.select(pid.alias("pid"), F.lit(-1).alias("s"), F.col(by).cast("int").alias("a"),
                         F.col(via).cast("int").alias("b"), F.col("r").cast("double").alias("x"),
                         F.col("res").cast("double").alias("y"), F.lit(1).alias("kind"))
    wanted = keys.select(pid.alias("pid"), F.lit(-1).alias("s"), F.col(by).cast("int").alias("a"),
                         F.col(via).cast("int").alias("b"), F.lit(None).cast("double").alias("x"),
                         F.lit(None).cast("double").alias("y"), F.lit(2).alias("kind"))
    # Unsorted: the lists and ratings are kept whole anyway, and the pairs only as two id arrays
    # until the partition has been read (8 bytes a pair). The sort that put them in order spilled.
    rows = movies_then_users(list_rows, rated.unionByName(wanted), parts, ordered=False)
    n_sets = len(lists)
    shrink = [float(s) for s in shrinks]
    key_is_user = by == "userId"

    cols = schema(names).split(", ")
    col_names = [c.split()[0] for c in cols]

    def run(batches):
        import numpy as np
        import pyarrow as pa

        lists_b, rated_b, want_a, want_b = [], [], [], []
        for b in batches:
            kind = b.column("kind").to_numpy()
            for k, keep in ((0, lists_b), (1, rated_b)):
                mask = kind == k
                if mask.any():
                    keep.append(b.filter(pa.array(mask)))
            mask = kind == 2
            if mask.any():
                want_a.append(b.column("a").to_numpy()[mask])
                want_b.append(b.column("b").to_numpy()[mask])
        if not want_a:
            return
        table = _tables(lists_b, rated_b, n_sets, np, pa)
        del lists_b, rated_b
        key_a, key_b = np.concatenate(want_a), np.concatenate(want_b)
        del want_a, want_b
        for lo in range(0, len(key_a), CHUNK):
            out = _score(key_a[lo:lo + CHUNK], key_b[lo:lo + CHUNK], table, shrink, np)
            if out is None:
                continue
            key_by, key_via, sets = out
            users, movies = (key_by, key_via) if key_is_user else (key_via, key_by)
            arrays = [pa.array(users, pa.int32()), pa.array(movies, pa.int32())]
            for top, n_top, knn, cnt, near_sim, has, near_any in sets:
                arrays += [pa.array(top[:, i], pa.float64(), mask=n_top <= i) for i in range(TOP)]
                arrays += [pa.array(n_top, pa.int32()), pa.array(knn, pa.float64(), mask=~has),
                           pa.array(cnt, pa.int64()), pa.array(near_sim, pa.float64(), mask=~near_any)]
            yield pa.RecordBatch.from_arrays(arrays, names=col_names)

    return rows.mapInArrow(run, ", ".join(cols))


def _tables(lists_b, rated_b, n_sets, np, pa):
    """The partition's lookup tables: per list set the padded neighbour matrix of each via value,
    and the ratings sorted by (by, via) code."""
    lists = pa.Table.from_batches(lists_b) if lists_b else None
    rated = pa.Table.from_batches(rated_b) if rated_b else None
    sets = []
    for s in range(n_sets):
        if lists is None or lists.num_rows == 0:
            e = nb = np.empty(0, np.int64)
            sim = near = np.empty(0)
        else:
            keep = lists.column("s").to_numpy() == s
            e = lists.column("a").to_numpy()[keep].astype(np.int64)
            nb = lists.column("b").to_numpy()[keep].astype(np.int64)
            sim = lists.column("x").to_numpy()[keep]
            near = lists.column("y").to_numpy()[keep]
        # A partition may hold two copies of the lists (two pids hashed to one partition).
        order = np.lexsort((nb, e))
        e, nb, sim, near = e[order], nb[order], sim[order], near[order]
        first = np.ones(len(e), bool)
        first[1:] = (e[1:] != e[:-1]) | (nb[1:] != nb[:-1])
        e, nb, sim, near = e[first], nb[first], sim[first], near[first]
        ids, start, counts = np.unique(e, return_index=True, return_counts=True)
        width = max(int(counts.max()) if len(counts) else 0, TOP)
        slot = np.arange(len(e)) - np.repeat(start, counts)
        row = np.repeat(np.arange(len(ids)), counts)
        m_nb = np.zeros((len(ids), width), np.int64)
        m_sim = np.zeros((len(ids), width))
        m_ok = np.zeros((len(ids), width), bool)
        m_near = np.zeros((len(ids), width), bool)
        m_nb[row, slot], m_sim[row, slot], m_ok[row, slot], m_near[row, slot] = nb, sim, True, near > 0
        sets.append((ids, m_nb, m_sim, m_ok, m_near))
    if rated is None or rated.num_rows == 0:
        codes, r, res = np.empty(0, np.int64), np.empty(0), np.empty(0)
    else:
        codes = _code(rated.column("a").to_numpy(), rated.column("b").to_numpy(), np)
        order = np.argsort(codes, kind="stable")
        codes, r, res = codes[order], rated.column("x").to_numpy()[order], rated.column("y").to_numpy()[order]
    return sets, codes, r, res


def _code(a, b, np):
    """One int64 per (a, b) pair of int32 ids: equal exactly when both are."""
    return (a.astype(np.int64) << 32) | (b.astype(np.int64) & 0xFFFFFFFF)


def _score(key_by, key_via, table, shrink, np):
    """Every set's features of a chunk of pairs; None when no pair has a hit in any set."""
    sets, codes, r_all, res_all = table
    cols = []
    any_hit = np.zeros(len(key_by), bool)
    for (ids, m_nb, m_sim, m_ok, m_near), sh in zip(sets, shrink):
        n = len(key_by)
        width = m_nb.shape[1]
        if len(ids) == 0 or len(codes) == 0:
            hit = np.zeros((n, width), bool)
            sim = r = res = np.zeros((n, width))
            near = hit
        else:
            at = np.minimum(np.searchsorted(ids, key_via), len(ids) - 1)
            listed = ids[at] == key_via
            q = _code(np.repeat(key_by[:, None], width, 1), m_nb[at], np)
            pos = np.minimum(np.searchsorted(codes, q), len(codes) - 1)
            hit = (codes[pos] == q) & m_ok[at] & listed[:, None]
            sim = m_sim[at]
            r, res = r_all[pos], res_all[pos]
            near = hit & m_near[at]
        cnt = hit.sum(axis=1)
        num = np.where(hit, sim * res, 0.0).sum(axis=1)
        den = np.where(hit, sim, 0.0).sum(axis=1)
        has = cnt > 0
        knn = np.where(has, num / np.where(has, den + sh, 1.0), 0.0)
        # sort_array(struct(-sim, r)) ascending: most similar first, then the lower rating.
        order = np.lexsort((np.where(near, r, np.inf), np.where(near, -sim, np.inf)), axis=1)[:, :TOP]
        top = np.take_along_axis(r, order, axis=1)
        n_top = np.minimum(near.sum(axis=1), TOP)
        near_any = near.any(axis=1)
        near_sim = np.where(near, sim, 0.0).sum(axis=1)
        cols.append([top, n_top, knn, cnt, near_sim, has, near_any])
        any_hit |= has
    if not any_hit.any():
        return None
    for c in cols:
        for j in range(len(c)):
            c[j] = c[j][any_hit]
    return key_by[any_hit], key_via[any_hit], cols
