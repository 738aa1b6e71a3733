"""The bench's results database: one SQLite file (stdlib ``sqlite3``, WAL mode) with one row per
run (its full config, status and result) and its per-step metrics.

Resumable without recomputing or half-counting:
- a run is identified by a hash of its canonical config, so rerunning the same grid finds the runs
  already done and skips them;
- a worker *claims* a pending run in a transaction (so two workers never take the same run), keeps
  its step metrics in memory, and writes them together with the result in one transaction when the
  run ends: a run killed mid-way (even ``kill -9``) leaves no metrics behind, only a ``running``
  row whose owner is dead, which :meth:`ResultStore.reset_stale` puts back to ``pending``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key       TEXT PRIMARY KEY,
    config    TEXT NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    owner     TEXT,
    started   REAL,
    finished  REAL,
    result    TEXT,
    error     TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    key      TEXT NOT NULL REFERENCES runs(key),
    step     INTEGER NOT NULL,
    metrics  TEXT NOT NULL,
    PRIMARY KEY (key, step)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def run_key(config: Mapping[str, Any]) -> str:
    """A stable id for a run: the same config always gets the same key."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:20]


def this_owner() -> str:
    """Who is running a run: host and process id (liveness is checked on the same host)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's worker: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


class ResultStore:
    """The results database of one bench folder."""

    def __init__(self, path: str | Path, timeout: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ConfigError(
                f"{self.path} is not a gradguard results database ({e}); point --out at a fresh folder"
            ) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self):
        return _Transaction(self.conn)

    # ----- the grid -------------------------------------------------------------------------------
    def add_runs(self, configs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Register runs (idempotent: a config already present keeps its status and result)."""
        keys = []
        with self._tx():
            for cfg in configs:
                key = run_key(cfg)
                keys.append(key)
                self.conn.execute(
                    "INSERT OR IGNORE INTO runs (key, config, status) VALUES (?, ?, 'pending')",
                    (key, canonical_json(cfg)),
                )
        return keys

    def reset_stale(self) -> int:
        """Put back to ``pending`` every ``running`` run whose owner process is gone, dropping any
        metrics it left (there are none unless a finish was interrupted, which a transaction
        prevents). Returns how many."""
        with self._tx():
            rows = self.conn.execute(
                "SELECT key, owner FROM runs WHERE status = 'running'"
            ).fetchall()
            stale = [k for k, owner in rows if owner is None or not owner_alive(owner)]
            for key in stale:
                self.conn.execute("DELETE FROM steps WHERE key = ?", (key,))
                self.conn.execute(
                    "UPDATE runs SET status = 'pending', owner = NULL, started = NULL WHERE key = ?",
                    (key,),
                )
        return len(stale)

    def claim(
        self, keys: Sequence[str] | None = None, owner: str | None = None
    ) -> tuple[str, dict] | None:
        """Take the next pending run (among ``keys`` if given) for ``owner``; None when none is left."""
        owner = owner or this_owner()
        with self._tx():
            if keys is None:
                row = self.conn.execute(
                    "SELECT key, config FROM runs WHERE status = 'pending' ORDER BY rowid LIMIT 1"
                ).fetchone()
            else:
                row = None
                for key in keys:
                    row = self.conn.execute(
                        "SELECT key, config FROM runs WHERE key = ? AND status = 'pending'", (key,)
                    ).fetchone()
                    if row:
                        break
            if row is None:
                return None
            self.conn.execute(
                "UPDATE runs SET status = 'running', owner = ?, started = ? WHERE key = ?",
                (owner, time.time(), row[0]),
            )
        return row[0], json.loads(row[1])

    def release(self, key: str, owner: str | None = None) -> None:
        """Put a run that ``owner`` claimed but will not finish back to ``pending`` (its work was
        lost elsewhere, e.g. a Ray worker died), so the next invocation redoes it. It has no
        metrics to drop: those are written only with its result."""
        owner = owner or this_owner()
        with self._tx():
            self.conn.execute(
                "UPDATE runs SET status = 'pending', owner = NULL, started = NULL"
                " WHERE key = ? AND status = 'running' AND owner = ?",
                (key, owner),
            )

    def finish(
        self,
        key: str,
        result: Mapping[str, Any],
        steps: Sequence[Mapping[str, Any]] = (),
        owner: str | None = None,
    ) -> None:
        """Record a finished run: its result and all its step metrics, in one transaction."""
        self._end(key, "done", owner, result=result, steps=steps)

    def fail(self, key: str, error: str, owner: str | None = None) -> None:
        """Record a run that raised (not a divergence: a bug or a bad config)."""
        self._end(key, "failed", owner, error=error)

    def _end(self, key, status, owner, result=None, steps=(), error=None) -> None:
        owner = owner or this_owner()
        with self._tx():
            row = self.conn.execute(
                "SELECT status, owner FROM runs WHERE key = ?", (key,)
            ).fetchone()
            if row is None or row[0] != "running" or row[1] != owner:
                raise ConfigError(
                    f"run {key} is not running under {owner} (status {row[0] if row else 'missing'}); it was reset or finished elsewhere"
                )
            self.conn.execute("DELETE FROM steps WHERE key = ?", (key,))
            self.conn.executemany(
                "INSERT INTO steps (key, step, metrics) VALUES (?, ?, ?)",
                [
                    (
                        key,
                        int(s["step"]),
                        canonical_json({k: v for k, v in s.items() if k != "step"}),
                    )
                    for s in steps
                ],
            )
            self.conn.execute(
                "UPDATE runs SET status = ?, finished = ?, result = ?, error = ? WHERE key = ?",
                (
                    status,
                    time.time(),
                    canonical_json(result) if result is not None else None,
                    error,
                    key,
                ),
            )

    # ----- reading --------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        return {"pending": 0, "running": 0, "done": 0, "failed": 0, **dict(rows)}

    def counts_of(self, keys: Sequence[str]) -> dict[str, int]:
        """Status counts among ``keys`` (a grid inside a database that holds several)."""
        out = {"pending": 0, "running": 0, "done": 0, "failed": 0}
        wanted = set(keys)
        for key, status in self.conn.execute("SELECT key, status FROM runs").fetchall():
            if key in wanted:
                out[status] += 1
        return out

    def runs(
        self, status: str | None = "done", keys: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Finished runs as dicts: ``key``, ``config``, ``result`` (or ``error``)."""
        sql = "SELECT key, config, status, result, error FROM runs"
        rows = self.conn.execute(
            sql + (" WHERE status = ?" if status else ""), (status,) if status else ()
        ).fetchall()
        wanted = set(keys) if keys is not None else None
        return [
            {
                "key": k,
                "config": json.loads(c),
                "status": s,
                "result": json.loads(r) if r else None,
                "error": e,
            }
            for k, c, s, r, e in rows
            if wanted is None or k in wanted
        ]

    def steps(self, key: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT step, metrics FROM steps WHERE key = ? ORDER BY step", (key,)
        ).fetchall()
        return [{"step": s, **json.loads(m)} for s, m in rows]

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error): the write lock is taken up
    front, so two workers claiming at once serialize instead of deadlocking."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
