"""Where retia keeps what it generates once and reuses (synthetic datasets, trained parent networks)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root(override: str | Path | None = None) -> Path:
    """``override`` when given, else ``$RETIA_CACHE``, else ``~/.cache/retia``."""
    return Path(override or os.environ.get("RETIA_CACHE") or Path.home() / ".cache" / "retia").expanduser()
