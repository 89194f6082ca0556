"""The state that the workers of one server (a gunicorn master's workers) share, in files.

A server is several worker processes that each hold their own copy of every model. What the
server should hold is one DESIRED state, `desired.json` in the run folder (TURSI_RUN_DIR):
{model name: {"options": load options, "since": wall time of the request}}. Every worker
reconciles its own models to it (tursi.engine.manager). What each worker holds is its REPORT,
`workers/<pid>-<token>.json`, rewritten every housekeeping tick; the views of the whole
server (GET /models, /status, the model metrics) combine the live reports.

Files, not a process: every worker reads and writes them itself, so there is nothing more
to run or to keep alive, and a worker that replaces a killed one finds the truth on disk.
`desired.json` is changed only under an fcntl lock and replaced atomically (tmp file +
os.replace), so a reader never sees half of it and needs no lock. Call the locking methods
from native threads only: a blocking flock on a gevent greenlet would stop its hub.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DESIRED = "desired.json"
LOCK = "desired.lock"
WORKERS = "workers"


class ServerState:
    """One worker's handle on a run folder; `token` keeps two managers of one process apart."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.pid = os.getpid()
        self.token = secrets.token_hex(4)
        self.report_name = f"{self.pid}-{self.token}.json"
        os.makedirs(os.path.join(run_dir, WORKERS), exist_ok=True)
        # (file key, contents): one tuple, replaced whole, because the hub and the
        # housekeeping thread both read it (two fields could pair one file's key with
        # another's contents).
        self._desired_cache: tuple[tuple[int, int, int] | None, dict[str, Any]] = (None, {})

    # --- desired state ----------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the desired state's lock (other processes, and other managers here, wait)."""
        with open(os.path.join(self.run_dir, LOCK), "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.run_dir, DESIRED))

    def desired(self) -> dict[str, dict[str, Any]]:
        """The desired state (a copy); re-read only when the file changed."""
        path = os.path.join(self.run_dir, DESIRED)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return {}
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        cached_key, desired = self._desired_cache
        if key != cached_key:
            with open(path) as file:
                desired = json.load(file)
            self._desired_cache = (key, desired)
        return {name: dict(entry) for name, entry in desired.items()}

    def write_desired(self, desired: dict[str, dict[str, Any]]) -> None:
        """Replace the desired state; call under `locked()`."""
        _write_atomic(os.path.join(self.run_dir, DESIRED), desired)

    # --- reports ----------------------------------------------------------------------------

    def write_report(self, report: dict[str, Any]) -> None:
        _write_atomic(os.path.join(self.run_dir, WORKERS, self.report_name), report)

    def remove_report(self) -> None:
        try:
            os.remove(os.path.join(self.run_dir, WORKERS, self.report_name))
        except FileNotFoundError:
            pass

    def other_reports(self) -> list[dict[str, Any]]:
        """The reports of the other live workers. A dead worker's report is removed: its
        models are gone with it."""
        folder = os.path.join(self.run_dir, WORKERS)
        reports = []
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json") or name == self.report_name:
                continue
            path = os.path.join(folder, name)
            if not _alive(int(name.split("-", 1)[0])):
                _remove(path)
                continue
            try:
                with open(path) as file:
                    reports.append(json.load(file))
            except (FileNotFoundError, json.JSONDecodeError):  # removed meanwhile
                continue
        return reports


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as file:
        json.dump(data, file)
    os.replace(tmp, path)
