"""The one reader of `dvc.lock`: the content hash DVC recorded for each stage's deps and outs."""

from __future__ import annotations

from pathlib import Path

import yaml


def _hash(entry: dict) -> str:
    return entry.get("md5") or entry.get("hash") or ""


def read_lock(lock_file: str | Path = "dvc.lock") -> dict[str, dict]:
    """Stage name -> its lock entry (empty when there is no lock file yet)."""
    lock = Path(lock_file)
    if not lock.exists():
        return {}
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) or {}


def stage_outs(lock_file: str | Path, stage: str) -> dict[str, str]:
    """Output path -> content hash of `stage`."""
    return {o["path"]: _hash(o) for o in read_lock(lock_file).get(stage, {}).get("outs", [])}


def known_hashes(lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """Path -> content hash of every dep and out of every stage."""
    known: dict[str, str] = {}
    for entry in read_lock(lock_file).values():
        for item in [*entry.get("deps", []), *entry.get("outs", [])]:
            known[item["path"]] = _hash(item)
    return known
