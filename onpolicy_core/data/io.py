"""Atomic file output and line-checked JSONL input.

Every artefact is written to a temporary sibling and renamed into place, so a killed stage never
leaves a half-written file that a later stage (or DVC) would take for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Unreadable input, named by file and line."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""mkstemp/mkdtemp create 0600/0700 entries; outputs get the modes a plain open()/mkdir() would."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~UMASK)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in blocks (model files can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_parquet(path: str | Path, rows: list[dict], schema: Any = None) -> None:
    """Rows as a Parquet table (pyarrow), written atomically; `schema` (a pyarrow schema) fixes the
    column types, which an empty table needs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict | InputError]]:
    """Yield (line number, object) per non-empty line; a broken line yields an `InputError` instead
    of raising, so callers can count it as a skip and go on. A missing file or a folder is an error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'is a folder, not a JSONL file' if path.is_dir() else 'file not found'}")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, InputError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, InputError(f"{path}:{lineno}: invalid JSON ({exc.msg}, column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                yield lineno, InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def read_problems(path: str | Path) -> list:
    """The records of a JSONL file in the record format; a broken line or a record without the five
    string fields is an error naming file and line."""
    from onpolicy_core.data.records import Problem

    problems = []
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, InputError):
            raise obj
        try:
            problems.append(Problem.from_dict(obj))
        except ValueError as exc:
            raise InputError(f"{path}:{lineno}: {exc}") from exc
    return problems


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file the pipeline wrote itself; any broken line is an error naming file and line."""
    rows = []
    for _, obj in iter_jsonl(path):
        if isinstance(obj, InputError):
            raise obj
        rows.append(obj)
    return rows


def claim_work_dir(work_dir: str | Path, fingerprint: dict) -> list[str]:
    """Keep the work folder of a resumable job only if it was made under the same `fingerprint`
    (stamped in fingerprint.json); otherwise discard it. The folder exists, stamped, afterwards.
    Returns the fingerprint keys that differed when an old folder was discarded ([] otherwise).
    Shard workers claim the same folder at once, so the check holds a file lock beside it."""
    from filelock import FileLock

    work_dir = Path(work_dir)
    stamp = work_dir / "fingerprint.json"
    expected = json.loads(json.dumps(fingerprint, sort_keys=True))
    changed: list[str] = []
    work_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(work_dir.parent / f".{work_dir.name}.lock")):
        if work_dir.exists():
            try:
                old = json.loads(stamp.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != expected:
                changed = sorted(k for k in expected if not isinstance(old, dict) or old.get(k) != expected[k]) or ["settings"]
                shutil.rmtree(work_dir)
        if not work_dir.exists():
            work_dir.mkdir(parents=True)
            write_json(stamp, fingerprint)
    return changed


class UnitsMissing(InputError):
    """A merge found work units that no shard has finished."""


class ShardedResults:
    """Results of a long stage, checkpointed in numbered work units so a killed run resumes and
    several shard workers can fill one folder.

    The work folder sits beside the final output and carries a fingerprint of everything the
    results depend on (config, input, model); a mismatching fingerprint discards the old units,
    so a resumed run or a merge can never mix results computed under different settings. Each
    unit file appears whole or not at all (atomic rename), so a worker killed mid-write leaves
    nothing that a merge would read.
    """

    def __init__(self, work_dir: str | Path, fingerprint: dict):
        self.dir = Path(work_dir)
        self.fingerprint = fingerprint
        claim_work_dir(self.dir, fingerprint)

    def _unit(self, index: int) -> Path:
        return self.dir / f"unit-{index:05d}.jsonl"

    def done(self, index: int) -> bool:
        return self._unit(index).is_file()

    def write(self, index: int, rows: list[dict]) -> None:
        write_jsonl(self._unit(index), rows)

    def read(self, index: int) -> list[dict]:
        return read_jsonl(self._unit(index))

    def collect(self, total: int) -> list[dict]:
        """Every unit's rows in order; UnitsMissing names the units no worker has finished."""
        missing = [i for i in range(total) if not self.done(i)]
        if missing:
            raise UnitsMissing(f"{self.dir}: {len(missing)} of {total} work units not finished ({_ranges(missing)}); "
                               "run the shards that hold them (or the stage without --merge)")
        return [row for i in range(total) for row in self.read(i)]

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.dir.parent / f".{self.dir.name}.lock").unlink()
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()  # the shared .<folder>.partial, once its last stage is done


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> 'units 0-2, 5'."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ("unit " if len(indices) == 1 else "units ") + ", ".join(parts)
