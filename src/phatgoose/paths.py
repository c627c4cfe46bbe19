"""Where phatgoose keeps its on-disk cache."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PHATGOOSE_CACHE`` if set, else ``~/.cache/phatgoose``."""
    return Path(os.environ.get("PHATGOOSE_CACHE") or "~/.cache/phatgoose").expanduser()
