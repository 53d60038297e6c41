"""The run-time changes to the registry, kept in a state file so they survive a restart.

The config file (or the flags) stays the declarative starting point; the state file holds
the changes made through the admin API on top of it (register, deregister, update,
promote), in order. Start-up, a SIGHUP reload and every worker process compute the
registry the same way: the config's backends, then the recorded changes replayed. The
file is rewritten atomically (a temporary file renamed over it) under an exclusive lock,
so workers appending at the same time never lose a change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class StateFile:
    """Reads, appends to, and notices changes of the state file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(f".{path.name}.lock")
        self._seen: tuple[int, int, int] | None = None

    def load(self) -> list[dict[str, Any]]:
        """The recorded changes, oldest first; none when the file does not exist."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._seen = None
            return []
        except OSError as exc:
            raise ConfigError(
                f"--state-file: cannot read {self.path}: {exc.strerror or exc}"
            ) from None
        self._seen = self._stamp()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--state-file: {self.path} is not valid JSON: {exc.msg}") from None
        if not isinstance(data, dict) or not isinstance(data.get("changes"), list):
            raise ConfigError(f"--state-file: {self.path} holds no list of changes")
        return [c for c in data["changes"] if isinstance(c, dict)]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the exclusive lock (other workers wait) for a read-change-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, change: Mapping[str, Any]) -> None:
        """Add a change; call while holding :meth:`locked`, after :meth:`load`."""
        changes = self.load()
        changes.append(dict(change))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        body = json.dumps({"version": FORMAT_VERSION, "changes": changes}, indent=1)
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(body + "\n")
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(self.path)
        self._seen = self._stamp()

    def changed(self) -> bool:
        """True when the file differs from what this process last read or wrote."""
        return self._stamp() != self._seen

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)
