"""Secrets never leave the process: config keys and values that look like credentials are
shown as Spark shows them, `*********(redacted)`, in logs and in every table a run writes.

No dependencies (the JVM-free query path uses it too).
"""

from __future__ import annotations

import re
from typing import Any

# Spark's own `spark.redaction.regex` default ("(?i)secret|password|token|access[.]key"),
# widened to the names the cloud stores use for their keys: Azure account keys and SAS tokens,
# GCS private keys, and anything called a credential. The session sets Spark's regex to this
# one too, so Spark's UI and event logs hide the same keys.
SECRET_KEY_PATTERN = (r"(?i)secret|password|passwd|token|access[._-]?key|account[._-]?key|private[._-]?key"
                      r"|(?:^|[._-])sas(?:$|[._-])|credential")
SECRET_KEY = re.compile(SECRET_KEY_PATTERN)
REDACTED = "*********(redacted)"
# user:password@ in a URI (s3a://KEY:SECRET@bucket/...).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def redact_text(text: str) -> str:
    """`text` with the credentials of any URI in it (user:password@) replaced."""
    return _USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def redact(obj: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) with the value of every key that looks like
    a secret replaced by REDACTED, and credentials in URIs removed."""
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, key) for v in obj]
    if key and obj not in (None, "") and SECRET_KEY.search(key):
        return REDACTED
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
