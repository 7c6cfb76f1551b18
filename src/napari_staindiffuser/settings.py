"""Small user settings kept between sessions: the recently used model checkpoints.

Stored as JSON in ``$XDG_CONFIG_HOME/napari-staindiffuser/settings.json`` (``~/.config`` when
the variable is unset; ``%APPDATA%`` on Windows), written atomically. A damaged or unreadable
settings file is ignored (and replaced on the next write), never an error: settings are a
convenience, not user data.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MAX_RECENT", "add_recent_model", "recent_models", "settings_path"]

MAX_RECENT = 10


def settings_path() -> Path:
    """Where the settings live (the folder may not exist yet)."""
    base = os.environ.get("XDG_CONFIG_HOME")
    if not base:
        if sys.platform == "win32" and os.environ.get("APPDATA"):
            base = os.environ["APPDATA"]
        else:
            base = str(Path.home() / ".config")
    return Path(base) / "napari-staindiffuser" / "settings.json"


def _load() -> dict[str, Any]:
    try:
        data = json.loads(settings_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(data: dict[str, Any]) -> None:
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".settings-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    except OSError:  # a read-only home must not break the plugin
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def recent_models() -> list[Path]:
    """Recently used checkpoint files, most recent first; files that no longer exist are left
    out."""
    items = _load().get("recent_models", [])
    out: list[Path] = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str) and Path(item).is_file() and Path(item) not in out:
            out.append(Path(item))
    return out


def add_recent_model(path: str | os.PathLike) -> list[Path]:
    """Put ``path`` (made absolute) first in the recent models; keep at most ``MAX_RECENT``."""
    p = Path(path).expanduser().resolve()
    items = [p] + [q for q in recent_models() if q != p]
    data = _load()
    data["recent_models"] = [str(q) for q in items[:MAX_RECENT]]
    _save(data)
    return items[:MAX_RECENT]
