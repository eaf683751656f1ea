"""OUTPUT as an fsspec folder: atomic commits, listing, reading, with retries, and the questions every
command asks of it (is there a quality table here, is it finished, what did the run record).

A file becomes visible under its final name only when complete: it is written under `_staging/` and then
moved (a rename on local disks; a server-side copy on object stores, whose target appears whole). The
names of OUTPUT's files are declared in `schemas.layout`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import RUN_FILE, SCORES, STAGING, SUCCESS_FILE, RunRecord
from fiqa_curator.workers.io import filesystem, with_retries


class OutputError(UserError):
    """OUTPUT cannot be created or written, or holds no quality table where one is needed."""


class Output:
    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if any(char in url for char in "[]*?"):
            # fsspec expands these as patterns in rm/mv on object stores: "--overwrite" could hit another run
            raise OutputError(f"OUTPUT must not contain [ ] * or ?: {url}")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.root = self.root.rstrip("/")

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def full_url(self, relative: str = "") -> str:
        return self.fs.unstrip_protocol(self.path(relative) if relative else self.root)

    def ensure_writable(self) -> None:
        """Create OUTPUT and prove it can be written, before any work is done."""
        probe = f"{STAGING}/.probe-{uuid.uuid4().hex}"
        try:
            with_retries(lambda: self.fs.makedirs(self.path(STAGING), exist_ok=True))
            with_retries(lambda: self.fs.pipe_file(self.path(probe), b"ok"))
            with_retries(lambda: self.fs.rm_file(self.path(probe)))
        except Exception as error:
            raise OutputError(
                f"OUTPUT is not writable: {self.url}: {type(error).__name__}: {error}"
            ) from error

    def check_writable(self) -> None:
        """`ensure_writable` for a check ahead of the work, which may still fail before any (INPUT without
        images): on a local disk, the folders it had to create are removed again, so that a failed command
        leaves no empty OUTPUT behind (object stores have no folders; the probe object is removed)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        created: list[str] = []  # the folders ensure_writable will create, deepest last
        if "file" in protocols:
            folder = self.path(STAGING)
            while folder and not self.fs.exists(folder):
                created.insert(0, folder)
                parent = posixpath.dirname(folder)
                folder = "" if parent == folder else parent
        try:
            self.ensure_writable()
        finally:  # also when the probe could not be written (a full disk, a quota)
            for folder in reversed(created):
                try:
                    self.fs.rmdir(folder)  # only if empty: whatever another process put there stays
                except OSError:
                    break

    def commit_bytes(self, relative: str, data: bytes) -> None:
        """Write `data` so that `relative` appears only once it is complete."""
        self._commit(relative, lambda staged: self.fs.pipe_file(staged, data))

    def commit_file(self, relative: str, local_path: str) -> None:
        """`commit_bytes` for a local file, streamed rather than read into memory (large lists)."""
        self._commit(relative, lambda staged: self.fs.put_file(local_path, staged))

    def _commit(self, relative: str, write: Callable[[str], Any]) -> None:
        final = self.path(relative)
        staged = self.path(f"{STAGING}/{posixpath.basename(relative)}.{uuid.uuid4().hex}.part")
        with_retries(lambda: self.fs.makedirs(self.path(STAGING), exist_ok=True))
        with_retries(lambda: write(staged))
        parent = posixpath.dirname(final)
        if parent:
            with_retries(lambda: self.fs.makedirs(parent, exist_ok=True))
        with_retries(lambda: self.fs.mv(staged, final))

    def read_bytes(self, relative: str) -> bytes | None:
        try:
            return with_retries(lambda: self.fs.cat_file(self.path(relative)))
        except FileNotFoundError:
            return None

    def list(self, relative: str) -> list[str]:
        """Names (not paths) of the files directly under `relative`; empty when it does not exist."""
        folder = self.path(relative).rstrip("/")
        try:
            self.fs.invalidate_cache(folder)
            entries = with_retries(lambda: self.fs.ls(folder, detail=True))
        except FileNotFoundError:
            return []
        # Object stores may list a folder's own marker; only files below it count.
        return sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in entries
            if entry.get("type") == "file" and entry["name"].rstrip("/") != folder
        )

    def table_fingerprint(self) -> str:
        """The quality table's file names, sizes and versions, hashed: results derived from the table (`fiqa
        identities`) record it, so that a command reading them refuses them once the table changed."""
        folder = self.path(SCORES)
        self.fs.invalidate_cache(folder)
        entries = with_retries(lambda: self.fs.ls(folder, detail=True))
        files = sorted(
            (
                posixpath.basename(entry["name"].rstrip("/")),
                int(entry.get("size") or 0),
                # a version where the store keeps one: a file rewritten at the same size still differs
                str(entry.get("ETag") or entry.get("mtime") or entry.get("LastModified") or ""),
            )
            for entry in entries
            if entry.get("type") == "file"
        )
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]

    def list_dirs(self, relative: str = "") -> list[str]:
        """Names of the folders directly under `relative` (object stores: common prefixes)."""
        folder = (self.path(relative) if relative else self.root).rstrip("/")
        try:
            self.fs.invalidate_cache(folder)
            entries = with_retries(lambda: self.fs.ls(folder, detail=True))
        except FileNotFoundError:
            return []
        return sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in entries
            if entry.get("type") == "directory" and entry["name"].rstrip("/") != folder
        )

    def remove(self, relative: str) -> None:
        target = self.path(relative)
        if with_retries(lambda: self.fs.exists(target)):
            with_retries(lambda: self.fs.rm(target, recursive=True))

    def clean_staging(self) -> None:
        """Drop leftovers of interrupted writes: they were never visible, so nothing refers to them."""
        for name in self.list(STAGING):
            with_retries(lambda name=name: self.fs.rm(self.path(f"{STAGING}/{name}"), recursive=True))

    # ---- the quality table and its run ------------------------------------------------------------------
    def has_table(self) -> bool:
        """Whether OUTPUT holds quality-table files (finished or not)."""
        return bool(self.list(SCORES))

    def require_table(self, *, finished: bool = False) -> None:
        """OutputError unless OUTPUT holds a quality table (and, with `finished`, a complete one)."""
        if not self.has_table():
            raise OutputError(f"no quality table in {self.url} (expected {SCORES}/*.parquet)")
        if finished and self.read_bytes(SUCCESS_FILE) is None:
            raise OutputError(
                f"{self.url} has no {SUCCESS_FILE}: the run is incomplete, so lists would miss "
                f"images; rerun the same `fiqa score` command to finish it first"
            )

    def read_run_record(self) -> RunRecord | None:
        raw = self.read_bytes(RUN_FILE)
        return RunRecord.from_json(raw) if raw else None

    def write_run_record(self, record: RunRecord) -> None:
        """The run record, then the success marker: a finished table is one with _SUCCESS."""
        self.commit_bytes(RUN_FILE, record.to_json())
        self.commit_bytes(SUCCESS_FILE, b"")
