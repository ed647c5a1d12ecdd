"""Ingest: every layout, every reject reason, idempotency, upsert, threshold, real data counts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.ingest import IngestError
from movierec_spark.layouts import LayoutError, detect_layout
from movierec_spark.ingest import ingest_dataset as ingest

from .conftest import make_config

NOW = 1_700_000_000  # a fixed "now" so far-future checks do not depend on the clock


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        (root / name).write_bytes(data)
    return root


def read(spark, cfg, name):
    return tables.read_table(spark, cfg.paths.warehouse, name)


def rows(df, *cols, order=None):
    return [tuple(r) for r in df.select(*cols).orderBy(*(order or cols)).collect()]


def ts(sec: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(sec, dt.timezone.utc).replace(tzinfo=None)


CSV_MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children\n"
    '2,"American President, The (1995)",Comedy|Drama|Romance\n'
    '3,"11\'09""01 - September 11 (2002)",Drama\n'
    "4,Babylon 5,(no genres listed)\n"
)
CSV_RATINGS = (
    "userId,movieId,rating,timestamp\n"
    "1,1,4.0,964982703\n"
    "1,2,3.5,964981247\n"
    "2,1,0.5,964982224\n"
    "2,3,5.0,964983815\n"
)


def test_csv_layout_values(spark, tmp_path):
    cfg = make_config(tmp_path / "wh")
    root = write_files(tmp_path / "ml", {
        "movies.csv": CSV_MOVIES,
        "ratings.csv": CSV_RATINGS,
        "tags.csv": "userId,movieId,tag,timestamp\n1,1,pixar,1445714994\n2,2,\"politics, romance\",1445714995\n",
        "links.csv": "movieId,imdbId,tmdbId\n1,0114709,862\n2,0112346,\n",
    })
    summary = ingest(spark, cfg, str(root), "r1", now=NOW)
    assert summary["ratings.csv"] == {"input": 4, "loaded": 4, "rejected": 0, "inserted": 4, "updated": 0}
    movies = read(spark, cfg, "movies")
    assert rows(movies, "movieId", "title", "year", "genres") == [
        (1, "Toy Story (1995)", 1995, ["Adventure", "Animation", "Children"]),
        (2, "American President, The (1995)", 1995, ["Comedy", "Drama", "Romance"]),
        (3, "11'09\"01 - September 11 (2002)", 2002, ["Drama"]),
        (4, "Babylon 5", None, []),
    ]
    assert rows(read(spark, cfg, "ratings"), "userId", "movieId", "rating", "rated_at") == [
        (1, 1, 4.0, ts(964982703)), (1, 2, 3.5, ts(964981247)),
        (2, 1, 0.5, ts(964982224)), (2, 3, 5.0, ts(964983815)),
    ]
    assert rows(read(spark, cfg, "tags"), "userId", "tag") == [(1, "pixar"), (2, "politics, romance")]
    assert rows(read(spark, cfg, "links"), "movieId", "imdbId", "tmdbId") == [(1, "0114709", 862), (2, "0112346", None)]
    # Explicit contract schemas, not inferred ones.
    assert read(spark, cfg, "ratings").schema["rated_at"].dataType.typeName() == "timestamp"
    assert read(spark, cfg, "movies").schema["genres"].dataType.simpleString() == "array<string>"


def test_uri_input_goes_through_hadoop_filesystem(spark, tmp_path):
    """A URI input (here file://, the same code path as s3a:// or abfss://) is listed, sniffed
    and read through Hadoop's FileSystem API: same layout, same rows as the local path."""
    from movierec_spark.fs import HadoopPath

    movies = "1::Toy Story (1995)::Animation\n2::Misérables, Les (1995)::Drama\n"
    write_files(tmp_path / "in" / "ml-1m", {
        "movies.dat": movies.encode("iso-8859-1"),
        "ratings.dat": "1::1::5::978300760\n1::2::3::978302109\n2::2::4::978301968\n",
        "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
    })
    uri = (tmp_path / "in").as_uri()  # the parent: the data directory is found one level down
    p = HadoopPath(uri, spark)
    assert p.is_dir() and not p.is_file() and (p / "ml-1m" / "movies.dat").size() == len(movies.encode("iso-8859-1"))
    layout = detect_layout(uri)
    assert (layout.name, layout.files["movies"].encoding) == ("dat", "ISO-8859-1")
    assert layout.files["ratings"].path.startswith("file:")
    cfg = make_config(tmp_path / "wh")
    summary = ingest(spark, cfg, uri, "r1", now=NOW)
    assert summary["ratings.dat"]["loaded"] == 3
    assert rows(read(spark, cfg, "movies"), "movieId", "title") == [(1, "Toy Story (1995)"), (2, "Misérables, Les (1995)")]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ingest(spark, cfg, (tmp_path / "nowhere").as_uri(), "r2", now=NOW)


def test_ml1m_dat_layout_latin1(spark, tmp_path):
    cfg = make_config(tmp_path / "wh")
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Misérables, Les (1995)::Drama\n"
    root = write_files(tmp_path / "ml-1m", {
        "movies.dat": movies.encode("iso-8859-1"),
        "ratings.dat": "1::1::5::978300760\n1::2::3::978302109\n2::2::4::978301968\n",
        "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
    })
    layout = detect_layout(root)
    assert (layout.name, layout.rating_step) == ("dat", 1.0)
    assert layout.files["movies"].encoding == "ISO-8859-1"
    ingest(spark, cfg, str(root), "r1", now=NOW)
    assert rows(read(spark, cfg, "movies"), "movieId", "title", "genres") == [
        (1, "Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
        (2, "Misérables, Les (1995)", ["Drama"]),
    ]
    assert rows(read(spark, cfg, "users"), "userId", "gender", "age", "occupation", "zip") == [
        (1, "F", 1, "10", "48067"), (2, "M", 56, "16", "70072"),
    ]
    assert read(spark, cfg, "ratings").count() == 3


def test_ml1m_rejects_half_stars(spark, tmp_path):
    cfg = make_config(tmp_path / "wh", ingest__reject_threshold=0.5)
    root = write_files(tmp_path / "ml-1m", {
        "movies.dat": "1::A (1990)::Drama\n",
        "ratings.dat": "1::1::3.5::978300760\n2::1::4::978300760\n",
        "users.dat": "1::F::1::10::48067\n2::M::1::10::48067\n",
    })
    ingest(spark, cfg, str(root), "r1", now=NOW)
    assert rows(read(spark, cfg, "rejects"), "source", "line", "reason") == [("ratings.dat", 1, "rating_off_step")]


def test_ml10m_dat_layout_with_tags(spark, tmp_path):
    cfg = make_config(tmp_path / "wh")
    root = write_files(tmp_path / "ml-10M100K", {
        "movies.dat": "1::Toy Story (1995)::Adventure|Animation\n2::Jumanji (1995)::(no genres listed)\n",
        "ratings.dat": "1::1::4.5::838985046\n1::2::3::838983525\n",
        "tags.dat": "15::1::excellent!::1215184630\n",
    })
    layout = detect_layout(root)
    assert (layout.rating_step, layout.files["movies"].encoding) == (0.5, "UTF-8")
    ingest(spark, cfg, str(root), "r1", now=NOW)
    assert rows(read(spark, cfg, "ratings"), "movieId", "rating") == [(1, 4.5), (2, 3.0)]
    assert rows(read(spark, cfg, "movies"), "movieId", "genres") == [(1, ["Adventure", "Animation"]), (2, [])]
    assert rows(read(spark, cfg, "tags"), "userId", "movieId", "tag") == [(15, 1, "excellent!")]
    assert not tables.table_exists(spark, tables.table_path(cfg.paths.warehouse, "users"))


def test_ml100k_layout(spark, tmp_path):
    cfg = make_config(tmp_path / "wh")
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
              "Thriller", "War", "Western"]
    flags1 = ["0"] * 19
    flags1[3] = flags1[4] = flags1[5] = "1"
    flags2 = ["1"] + ["0"] * 18
    item = (f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{'|'.join(flags1)}\n"
            f"2|Café au lait (1993)|01-Jan-1993||http://x|{'|'.join(flags2)}\n")
    root = write_files(tmp_path / "ml-100k", {
        "u.data": "196\t1\t3\t881250949\n186\t2\t5\t891717742\n",
        "u.item": item.encode("iso-8859-1"),
        "u.genre": "".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n",
        "u.user": "196|49|M|writer|55105\n186|39|F|executive|00000\n",
    })
    assert detect_layout(root).name == "100k"
    ingest(spark, cfg, str(root), "r1", now=NOW)
    assert rows(read(spark, cfg, "movies"), "movieId", "title", "year", "genres") == [
        (1, "Toy Story (1995)", 1995, ["Animation", "Children's", "Comedy"]),
        (2, "Café au lait (1993)", 1993, []),  # only 'unknown': like '(no genres listed)'
    ]
    assert rows(read(spark, cfg, "users"), "userId", "age", "gender", "occupation", "zip") == [
        (186, 39, "F", "executive", "00000"), (196, 49, "M", "writer", "55105"),
    ]
    assert rows(read(spark, cfg, "ratings"), "userId", "movieId", "rating") == [(186, 2, 5.0), (196, 1, 3.0)]


def test_zip_input_and_nested_dir(spark, tmp_path):
    import zipfile

    cfg = make_config(tmp_path / "wh")
    z = tmp_path / "ml-latest-small.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ml-latest-small/movies.csv", CSV_MOVIES)
        zf.writestr("ml-latest-small/ratings.csv", CSV_RATINGS)
    ingest(spark, cfg, str(z), "r1", now=NOW)
    assert read(spark, cfg, "ratings").count() == 4


def test_layout_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="no MovieLens ratings file found"):
        detect_layout(tmp_path / "empty")
    write_files(tmp_path / "half", {"ratings.csv": CSV_RATINGS})
    with pytest.raises(LayoutError, match="without movies.csv"):
        detect_layout(tmp_path / "half")


# One bad line per reason; the rest of each file is good.
BAD_RATINGS = {
    "1,1,4.0,964982703": None,  # line 2: good
    "1,2,4.0": "wrong_column_count",
    "x,2,4.0,964982703": "non_numeric_id",
    ",2,4.0,964982703": "null_key",
    "-5,2,4.0,964982703": "bad_id",
    "99999999999,2,4.0,964982703": "bad_id",
    "3,2,abc,964982703": "bad_rating",
    "3,2,NaN,964982703": "bad_rating",
    "3,2,7.0,964982703": "rating_off_scale",
    "3,2,0.0,964982703": "rating_off_scale",
    "3,2,3.7,964982703": "rating_off_step",
    "3,2,3.0,yesterday": "bad_timestamp",
    "3,2,3.0,-1": "bad_timestamp",
    "3,2,3.0,99999999999": "bad_timestamp",
    "3,777,3.0,964982703": "unknown_movie",
    "": "blank_line",
    '3,"2,4.0,964982703': "malformed",
    "4,1,2.0,964982000": "duplicate",  # an older rating of (4,1) ...
    "4,1,3.0,964982999": None,  # ... superseded by this later one
    "5,2,1.0,964982703": None,
}


def test_every_reject_reason_and_accounting(spark, tmp_path):
    cfg = make_config(tmp_path / "wh", ingest__reject_threshold=0.9)
    lines = list(BAD_RATINGS)
    root = write_files(tmp_path / "ml", {
        "movies.csv": CSV_MOVIES + "5,Bad (1999)\n" + "x,Bad id (1999),Drama\n",
        "ratings.csv": "userId,movieId,rating,timestamp\r\n" + "\r\n".join(lines) + "\r\n",
    })
    summary = ingest(spark, cfg, str(root), "run-rej", now=NOW)
    rejects = read(spark, cfg, "rejects")
    got = rows(rejects.where("source = 'ratings.csv'"), "line", "raw", "reason")
    expected = [(i + 2, raw, reason) for i, (raw, reason) in enumerate(BAD_RATINGS.items()) if reason]
    assert got == expected
    assert rows(rejects.where("source = 'movies.csv'"), "line", "reason") == [(6, "wrong_column_count"), (7, "non_numeric_id")]
    # input = loaded + rejected, per file, and the table holds exactly the loaded rows.
    for source, s in summary.items():
        assert s["input"] == s["loaded"] + s["rejected"], source
    assert summary["ratings.csv"]["input"] == len(lines)
    assert summary["ratings.csv"]["rejected"] == len(expected)
    assert rows(read(spark, cfg, "ratings"), "userId", "movieId", "rating") == [(1, 1, 4.0), (4, 1, 3.0), (5, 2, 1.0)]
    assert set(rejects.select("run_id").distinct().toPandas().run_id) == {"run-rej"}


def test_bom_and_header_only(spark, tmp_path):
    cfg = make_config(tmp_path / "wh")
    root = write_files(tmp_path / "ml", {
        "movies.csv": "\ufeff" + CSV_MOVIES,
        "ratings.csv": CSV_RATINGS,
        "tags.csv": "userId,movieId,tag,timestamp\n",
    })
    summary = ingest(spark, cfg, str(root), "r1", now=NOW)
    assert summary["movies.csv"]["loaded"] == 4 and summary["tags.csv"]["input"] == 0


def test_threshold_stops_and_leaves_tables(spark, tmp_path):
    cfg = make_config(tmp_path / "wh")
    good = write_files(tmp_path / "good", {"movies.csv": CSV_MOVIES, "ratings.csv": CSV_RATINGS})
    ingest(spark, cfg, str(good), "r1", now=NOW)
    path = tables.table_path(cfg.paths.warehouse, "ratings")
    from delta.tables import DeltaTable

    v0 = DeltaTable.forPath(spark, path).history(1).first()["version"]
    bad = write_files(tmp_path / "bad", {
        "movies.csv": CSV_MOVIES,
        "ratings.csv": CSV_RATINGS.replace("4.0", "9.0").replace("3.5", "abc") + "1,1,x,1\n",
    })
    # (--incremental: a plain ingest of other files would be refused as another dataset first.)
    with pytest.raises(IngestError, match=r"rejected, above the threshold of 5.0%; no table was changed"):
        ingest(spark, make_config(tmp_path / "wh", ingest__incremental=True), str(bad), "r2", now=NOW)
    assert DeltaTable.forPath(spark, path).history(1).first()["version"] == v0
    assert read(spark, cfg, "rejects").where("run_id = 'r2'").count() == 0


def test_idempotent_and_upsert(spark, tmp_path):
    from delta.tables import DeltaTable

    cfg = make_config(tmp_path / "wh")
    v1 = write_files(tmp_path / "v1", {"movies.csv": CSV_MOVIES, "ratings.csv": CSV_RATINGS})
    ingest(spark, cfg, str(v1), "r1", now=NOW)
    before = read(spark, cfg, "ratings")
    snapshot = spark.createDataFrame(before.collect(), before.schema)
    versions = {t: DeltaTable.forPath(spark, tables.table_path(cfg.paths.warehouse, t)).history(1).first()["version"]
                for t in ("ratings", "movies")}
    # Same input again: same contents and no new table versions.
    again = ingest(spark, cfg, str(v1), "r2", now=NOW)
    assert again["ratings.csv"]["inserted"] == 0 and again["ratings.csv"]["updated"] == 0
    assert_df_equality(read(spark, cfg, "ratings"), snapshot, ignore_row_order=True)
    for t, v in versions.items():
        assert DeltaTable.forPath(spark, tables.table_path(cfg.paths.warehouse, t)).history(1).first()["version"] == v
    # A newer input: one changed rating, one added. Other files than the warehouse holds: a
    # plain ingest refuses them (another dataset), --incremental merges them.
    newer = CSV_RATINGS.replace("1,2,3.5,964981247", "1,2,2.0,964990000") + "3,4,4.5,964999999\n"
    v2 = write_files(tmp_path / "v2", {"movies.csv": CSV_MOVIES, "ratings.csv": newer})
    with pytest.raises(IngestError, match="holds another dataset"):
        ingest(spark, cfg, str(v2), "r3", now=NOW)
    s = ingest(spark, make_config(tmp_path / "wh", ingest__incremental=True), str(v2), "r3", now=NOW)
    assert (s["ratings.csv"]["inserted"], s["ratings.csv"]["updated"]) == (1, 1)
    assert rows(read(spark, cfg, "ratings"), "userId", "movieId", "rating") == [
        (1, 1, 4.0), (1, 2, 2.0), (2, 1, 0.5), (2, 3, 5.0), (3, 4, 4.5),
    ]


def test_large_file_path_gives_same_lines(spark, tmp_path):
    """Files above whole_file_max_bytes are split across tasks; line numbers must still be exact."""
    n = 3000
    body = "".join(f"{u},1,{'x' if u % 997 == 0 else '3.0'},964982703\n" for u in range(1, n + 1))
    root = write_files(tmp_path / "ml", {"movies.csv": CSV_MOVIES, "ratings.csv": "userId,movieId,rating,timestamp\n" + body})
    cfg = make_config(tmp_path / "wh", ingest__whole_file_max_bytes=1024,
                      spark__conf={"spark.sql.files.maxPartitionBytes": "8192"})
    spark.conf.set("spark.sql.files.maxPartitionBytes", "8192")
    try:
        summary = ingest(spark, cfg, str(root), "r1", now=NOW)
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    bad = [u for u in range(1, n + 1) if u % 997 == 0]
    assert rows(read(spark, cfg, "rejects"), "line", "reason") == [(u + 1, "bad_rating") for u in bad]
    assert summary["ratings.csv"] == {"input": n, "loaded": n - len(bad), "rejected": len(bad), "inserted": n - len(bad), "updated": 0}


def test_ml_latest_small_exact_counts(spark, ml_small_wh):
    cfg, summary = ml_small_wh
    assert read(spark, cfg, "ratings").count() == 100_836
    assert read(spark, cfg, "movies").count() == 9_742
    assert read(spark, cfg, "tags").count() == 3_683
    assert read(spark, cfg, "links").count() == 9_742
    assert read(spark, cfg, "rejects").count() == 0
    assert all(s["rejected"] == 0 for s in summary.values())
    toy = read(spark, cfg, "movies").where("movieId = 1").first()
    assert (toy.title, toy.year, toy.genres) == ("Toy Story (1995)", 1995,
                                                 ["Adventure", "Animation", "Children", "Comedy", "Fantasy"])
    assert read(spark, cfg, "movies").where(F.size("genres") == 0).count() == 34


def test_genome_files_join_into_genome_table(spark, tmp_path):
    cfg = make_config(tmp_path / "wh", ingest__reject_threshold=0.5)
    root = write_files(tmp_path / "ml-25m", {
        "movies.csv": CSV_MOVIES,
        "ratings.csv": CSV_RATINGS,
        "genome-tags.csv": "tagId,tag\n1,007\n2,\"action, packed\"\n",
        "genome-scores.csv": "movieId,tagId,relevance\n1,1,0.02875\n1,2,0.9\n2,1,1.5\n2,9,0.5\n777,1,0.1\n",
    })
    summary = ingest(spark, cfg, str(root), "r1", now=NOW)
    assert rows(read(spark, cfg, "genome"), "movieId", "tagId", "tag", "relevance") == [
        (1, 1, "007", 0.02875), (1, 2, "action, packed", 0.9),
    ]
    assert rows(read(spark, cfg, "rejects").where("source = 'genome-scores.csv'"), "line", "reason") == [
        (4, "bad_rating"), (5, "unknown_tag"), (6, "unknown_movie"),
    ]
    assert summary["genome-scores.csv"]["input"] == 5


def test_upsert_appends_into_a_table_only_created_and_merges_afterwards(spark, tmp_path):
    # A table ensure_table created and nobody wrote to takes a plain append (no MERGE against
    # nothing); once written, rows are merged by key.
    from delta.tables import DeltaTable

    wh = str(tmp_path / "wh")
    path = tables.ensure_table(spark, wh, "latest")
    dt_ = DeltaTable.forPath(spark, path)
    assert tables._never_written(dt_)
    at = dt.datetime(2026, 1, 1)
    rows = spark.createDataFrame([("recommendations", "r1", 3, at)], schema=tables.TABLE_SCHEMAS["latest"])
    assert tables.upsert(spark, rows, wh, "latest") == {"inserted": 1, "updated": 0}
    assert dt_.history(1).first()["operation"] == "WRITE" and not tables._never_written(dt_)
    newer = spark.createDataFrame([("recommendations", "r2", 5, at)], schema=tables.TABLE_SCHEMAS["latest"])
    assert tables.upsert(spark, newer, wh, "latest") == {"inserted": 0, "updated": 1}
    assert dt_.history(1).first()["operation"] == "MERGE"
    assert_df_equality(tables.read_table(spark, wh, "latest"), newer, ignore_nullable=True)
