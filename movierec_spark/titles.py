"""Title matching for `movierec query similar --title`: case, accents, a trailing or leading
article and the year in parentheses do not matter."""

from __future__ import annotations

import array
import re

import pyarrow as pa
import pyarrow.compute as pc

from .query_io import EXIT_USAGE, QueryError

# "(1995)", and the "(2007-2013)" of series; RE2 (pyarrow) takes no \u escapes, hence the literal dash.
_YEAR_RE = r"\s*\(\s*(\d{4})(?:\s*[-" + "\u2013" + r"]\s*\d{0,4})?\s*\)\s*$"


# MovieLens moves articles to the end: "Matrix, The", "Cité des enfants perdus, La".
_ARTICLES = ("the", "a", "an", "les", "la", "le", "l'", "il", "el", "der", "die", "das", "los", "las",
             "lo", "gli", "i", "un", "une", "o", "os", "as", "det", "den", "de", "het", "en")


_TRAILING_ARTICLE = r",\s*(?:" + "|".join(re.escape(a) for a in _ARTICLES) + r")\s*$"


_LEADING_ARTICLE = r"^(?:the|a|an)\s+"


def _norm(arr: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Comparable title keys (full, main): lower case; accents, year, articles, punctuation gone.

    `main` also drops a trailing parenthesised alternative title ("Léon (Professional, The)").
    """
    s = pc.utf8_lower(pc.replace_substring_regex(pc.utf8_normalize(arr, form="NFKD"), r"\p{Mn}", ""))
    s = pc.utf8_trim_whitespace(pc.replace_substring_regex(s, _YEAR_RE, ""))

    def finish(x):
        x = pc.replace_substring_regex(pc.utf8_trim_whitespace(x), _TRAILING_ARTICLE, "")
        x = pc.replace_substring(pc.replace_substring_regex(x, _LEADING_ARTICLE, ""), "&", "and")
        return pc.replace_substring_regex(x, r"[^\p{L}\p{N}]+", "")

    return finish(s), finish(pc.replace_substring_regex(s, r"\s*\(.*\)$", ""))


def _str_array(values: list[str]) -> pa.Array:
    """A string array built from raw buffers: pa.array() would import pandas (0.2 s) to probe it."""
    data = [v.encode("utf-8") for v in values]
    offsets = [0]
    for d in data:
        offsets.append(offsets[-1] + len(d))
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(array.array("i", offsets).tobytes()),
                                       pa.py_buffer(b"".join(data)))


def match_title(movies: pa.Table, text: str) -> tuple[list[int], str]:
    """Movie ids matching `text` in the best tier (exact, prefix, substring), and the tier.

    A year in the text ("Toy Story (1995)") narrows the candidates when any have that year.
    """
    m = re.search(_YEAR_RE, text)
    year = int(m.group(1)) if m else None
    key = _norm(_str_array([text]))[0].to_pylist()[0]
    if not key:
        raise QueryError(f"--title {text!r}: nothing left to match after dropping punctuation and "
                         "articles; give more of the title or --movie ID", EXIT_USAGE)
    full, main = (a.to_pylist() for a in _norm(movies.column("title")))
    ids = movies.column("movieId").to_pylist()
    years = movies.column("year").to_pylist() if "year" in movies.column_names else [None] * len(ids)
    tiers = (
        ("exact", lambda f, m: f == key or m == key),
        ("prefix", lambda f, m: f.startswith(key) or m.startswith(key)),
        ("substring", lambda f, m: key in f),
    )
    for tier, hit in tiers:
        found = [(i, y) for i, f, m, y in zip(ids, full, main, years) if f is not None and hit(f, m)]
        if not found:
            continue
        same_year = [i for i, y in found if y == year]
        return (same_year if year is not None and same_year else [i for i, _ in found]), tier
    return [], ""
