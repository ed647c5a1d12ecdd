"""Which MovieLens layout a directory holds, detected from the files present.

GroupLens has shipped three layouts over the years:
- CSV with a header (ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m), UTF-8, half-star scale;
- `::`-separated .dat (ml-1m: ISO-8859-1, whole stars, users.dat; ml-10m: half stars, tags.dat);
- ml-100k: tab-separated u.data, pipe-separated u.item with 19 genre flags named by u.genre.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .fs import as_path

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class FileSpec:
    role: str  # ratings, movies, tags, users, links, genome_scores, genome_tags
    path: str
    sep: str  # "csv" (quote-aware comma), "::", "\t" or "|"
    columns: tuple[str, ...]  # the raw fields, in file order
    header: bool
    encoding: str = "UTF-8"


@dataclass(frozen=True)
class Layout:
    name: str  # "csv", "dat", "100k"
    root: str
    rating_min: float
    rating_max: float
    rating_step: float
    files: dict[str, FileSpec] = field(default_factory=dict)
    genre_names: tuple[str, ...] = ()  # ml-100k only: u.genre, in flag order


CSV_COLUMNS = {
    "ratings": ("userId", "movieId", "rating", "timestamp"),
    "movies": ("movieId", "title", "genres"),
    "tags": ("userId", "movieId", "tag", "timestamp"),
    "links": ("movieId", "imdbId", "tmdbId"),
    "genome_scores": ("movieId", "tagId", "relevance"),
    "genome_tags": ("tagId", "tag"),
}
CSV_FILES = {
    "ratings": "ratings.csv",
    "movies": "movies.csv",
    "tags": "tags.csv",
    "links": "links.csv",
    "genome_scores": "genome-scores.csv",
    "genome_tags": "genome-tags.csv",
}
DAT_COLUMNS = {
    "ratings": ("userId", "movieId", "rating", "timestamp"),
    "movies": ("movieId", "title", "genres"),
    "tags": ("userId", "movieId", "tag", "timestamp"),
    "users": ("userId", "gender", "age", "occupation", "zip"),
}
ML100K_USER_COLUMNS = ("userId", "age", "gender", "occupation", "zip")
ML100K_ITEM_FIXED = ("movieId", "title", "release_date", "video_release_date", "imdb_url")


MARKERS = ("ratings.csv", "ratings.dat", "u.data")


def _find_root(path: Path, depth: int = 3) -> Path:
    """The directory holding the data files: `path` itself, its single data subdirectory, or,
    when `path` holds nothing but one directory (a zip with an extra folder level), that
    directory's, up to `depth` levels down."""
    markers = MARKERS
    for m in markers:
        if (path / m).exists() and not (path / m).is_file():
            raise LayoutError(f"{path / m}: a directory (or something else) where the {m} file is expected")
    if any((path / m).is_file() for m in markers):
        return path
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))]
    hits = [d for d in subdirs if any((d / m).is_file() for m in markers)]
    if len(hits) == 1:
        return hits[0]
    entries = [d for d in path.iterdir() if not d.name.startswith((".", "__"))]
    if not hits and depth > 1 and len(entries) == 1 and entries[0].is_dir():
        try:
            return _find_root(entries[0], depth - 1)
        except LayoutError:
            pass
    raise LayoutError(
        f"{path}: no MovieLens ratings file found (looked for {', '.join(markers)} here and in "
        "one level of subdirectories); pass a MovieLens directory or the .zip GroupLens ships"
    )


def _utf8_or_latin1(p: Path) -> str:
    # ml-10m is UTF-8 and ml-1m is Latin-1; the movie file is small enough to sniff whole.
    try:
        p.read_bytes().decode("utf-8")
        return "UTF-8"
    except UnicodeDecodeError:
        return "ISO-8859-1"


def detect_layout(path: str | Path, partial: bool = False) -> Layout:
    """The layout of a MovieLens directory. `partial` (incremental input): a CSV directory may
    hold only some files, e.g. a ratings.csv of new and changed ratings; movie ids are then
    checked against the warehouse's movies."""
    root = _find_root(as_path(path))
    if (root / "ratings.csv").is_file():
        files = {}
        for role, fname in CSV_FILES.items():
            if (root / fname).exists() and not (root / fname).is_file():
                raise LayoutError(f"{root / fname}: a directory (or something else) where the {fname} file is expected")
            if (root / fname).is_file():
                files[role] = FileSpec(role, str(root / fname), "csv", CSV_COLUMNS[role], True)
        if "movies" not in files and not partial:
            raise LayoutError(f"{root}: ratings.csv without movies.csv (an incremental run, --incremental, "
                              "may leave it out)")
        if ("genome_scores" in files) != ("genome_tags" in files):
            raise LayoutError(f"{root}: genome-scores.csv and genome-tags.csv come together; one is missing")
        layout = Layout("csv", str(root), 0.5, 5.0, 0.5, files)
    elif (root / "ratings.dat").is_file():
        if not (root / "movies.dat").is_file():
            raise LayoutError(f"{root}: ratings.dat without movies.dat")
        ml1m = (root / "users.dat").is_file()
        enc = "ISO-8859-1" if ml1m else _utf8_or_latin1(root / "movies.dat")
        files = {}
        for role, cols in DAT_COLUMNS.items():
            p = root / f"{role}.dat"
            if p.is_file():
                files[role] = FileSpec(role, str(p), "::", cols, False, enc)
        # ml-1m rates in whole stars; ml-10m in half stars.
        layout = Layout("dat", str(root), 1.0 if ml1m else 0.5, 5.0, 1.0 if ml1m else 0.5, files)
    else:
        for need in ("u.item", "u.genre"):
            if not (root / need).is_file():
                raise LayoutError(f"{root}: u.data without {need} (ml-100k layout)")
        genre_lines = (root / "u.genre").read_bytes().decode("ISO-8859-1").splitlines()
        # u.genre is a fixed 19-line lookup ("name|index"), not data that grows.
        genres = [ln.split("|")[0] for ln in genre_lines if ln.strip()]
        enc = "ISO-8859-1"
        files = {
            "ratings": FileSpec("ratings", str(root / "u.data"), "\t", CSV_COLUMNS["ratings"], False, enc),
            "movies": FileSpec(
                "movies", str(root / "u.item"), "|", ML100K_ITEM_FIXED + tuple(f"g{i}" for i in range(len(genres))),
                False, enc,
            ),
        }
        if (root / "u.user").is_file():
            files["users"] = FileSpec("users", str(root / "u.user"), "|", ML100K_USER_COLUMNS, False, enc)
        layout = Layout("100k", str(root), 1.0, 5.0, 1.0, files, tuple(genres))
    log.info("detected %s layout in %s: %s", layout.name, root, ", ".join(sorted(layout.files)))
    return layout


def rating_file_spec(path: str | Path) -> FileSpec:
    """A standalone ratings file for predefined splits: ml-100k's u1.base (tab), `::` .dat, or
    CSV with userId,movieId,rating[,timestamp] (header optional). Timestamps are optional."""
    p = Path(path)
    if not p.is_file():
        raise LayoutError(f"ratings file not found: {p}")
    with open(p, "rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").strip().lstrip("\ufeff")
    sep = "::" if "::" in first else "\t" if "\t" in first else "csv"
    n = len(first.split({"csv": ","}.get(sep, sep)))
    if n not in (3, 4):
        raise LayoutError(f"{p}: expected 3 or 4 fields (userId, movieId, rating[, timestamp]), "
                          f"the first line has {n}: {first[:80]!r}")
    header = sep == "csv" and first.lower().startswith("userid")
    return FileSpec("ratings", str(p), sep, CSV_COLUMNS["ratings"][:n], header, "UTF-8")
