"""URLs as shown to people (answers, logs, errors): the credentials of `rtsp://user:password@camera/…` hidden."""
from __future__ import annotations

import re

CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#]*@")  # the user[:password]@ of a URL


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it hidden: `rtsp://user:pw@cam/1` → `rtsp://***@cam/1`."""
    return CREDENTIALS.sub(r"\1***@", text)
