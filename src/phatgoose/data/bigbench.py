"""Fetch BIG-bench JSON tasks from the ``bigbench`` sdist on PyPI, extracting only what is asked.

Layout of the cache (``$PHATGOOSE_CACHE`` or ``~/.cache/phatgoose``)::

    <cache>/bigbench/bigbench-1.0.0.tar.gz       the sdist (about 360 MB), downloaded once
    <cache>/bigbench/tasks/<task>/task.json      e.g. tasks/color/rgb/task.json

A parent task (``color``) has a ``task.json`` without examples and one sub-folder per subtask.
"""

from __future__ import annotations

import difflib
import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from tqdm import tqdm

from phatgoose.errors import DataError
from phatgoose.paths import cache_dir

BIGBENCH_VERSION = "1.0.0"
SDIST_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
_MEMBER = re.compile(r"^[^/]+/bigbench/benchmark_tasks/(.+)$")


def default_cache_dir() -> Path:
    """``$PHATGOOSE_CACHE`` if set, else ``~/.cache/phatgoose``."""
    return cache_dir()


def _tasks_dir(cache_dir: Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / "bigbench" / "tasks"


def _clean(name: str) -> str:
    clean = name.strip().strip("/")
    if not clean or any(part in ("", ".", "..") for part in clean.split("/")):
        raise DataError(f"{name!r} is not a BIG-bench task name; use names like 'color/rgb'")
    return clean


def bigbench_task_path(name: str, cache_dir: Path | None = None) -> Path:
    """The folder of an already fetched task (``cache_dir`` is the cache root, not .../bigbench)."""
    folder = _tasks_dir(cache_dir) / _clean(name)
    if not (folder / "task.json").is_file():
        raise DataError(
            f"BIG-bench task {name!r} is not in {folder.parent}; "
            f"run `phatgoose data bigbench {name}` first"
        )
    return folder


def fetch_bigbench(
    tasks: list[str], cache_dir: Path | None = None, sdist: Path | None = None
) -> dict[str, Path]:
    """Make sure each named task is extracted; return name -> task folder.

    Tasks already in the cache are not extracted again; the sdist is downloaded with pip only if
    some task is missing and neither ``sdist`` nor a cached copy is there.
    """
    names = [_clean(task) for task in tasks]
    tasks_dir = _tasks_dir(cache_dir)
    pending = [n for n in dict.fromkeys(names) if not (tasks_dir / n / "task.json").is_file()]
    if pending:
        archive = Path(sdist) if sdist else _download(tasks_dir.parent)
        _extract(archive, pending, tasks_dir)
    return {name: tasks_dir / name for name in names}


_OLD_PIP = "pip>=23,<26.3"


def _download(folder: Path) -> Path:
    """The cached sdist, downloaded with ``pip download`` if absent."""
    archive = folder / SDIST_NAME
    if archive.is_file():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    args = ["download", "--no-deps", f"bigbench=={BIGBENCH_VERSION}", "-d", str(folder)]
    cmd = [sys.executable, "-m", "pip", *args]
    if subprocess.run(cmd).returncode != 0 and not archive.is_file():
        # pip >= 26.3 refuses this sdist while preparing its metadata (bigbench declares a
        # file:// dependency); an older pip, run from its own wheel, still downloads it.
        with tempfile.TemporaryDirectory() as tmp:
            old = [sys.executable, "-m", "pip", "download", "--no-deps", _OLD_PIP, "-d", tmp]
            wheels = list(Path(tmp).glob("pip-*.whl")) if subprocess.run(old).returncode == 0 \
                else []
            if wheels:
                subprocess.run([sys.executable, str(wheels[0] / "pip"), *args])
    if not archive.is_file():
        raise DataError(
            f"could not download {SDIST_NAME}; run `{shlex.join(cmd)}` by hand, then retry "
            "(or pass the sdist's path)"
        )
    return archive


def _extract(archive: Path, pending: list[str], tasks_dir: Path) -> None:
    """Scan the sdist once and extract the pending tasks' task.json files (subtasks included).

    Files are staged in a temporary folder and moved into place deepest first only after the
    scan, so a parent's task.json, which marks the task as cached, is the last file written.
    """
    if not archive.is_file():
        raise DataError(f"{archive} does not exist; give the path of {SDIST_NAME} or omit it")
    tasks_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=tasks_dir))
    known: set[str] = set()  # folders with a task.json
    folders: set[str] = set()  # every folder, to recognise programmatic (task.py) tasks
    try:
        with (
            open(archive, "rb") as raw,
            tqdm.wrapattr(
                raw, "read", total=archive.stat().st_size, desc=f"scanning {archive.name}"
            ) as stream,
            tarfile.open(fileobj=stream, mode="r|gz") as tar,
        ):
            for member in tar:
                match = _MEMBER.match(member.name)
                if not match or not member.isfile():
                    continue
                folder, _, filename = match.group(1).rpartition("/")
                folders.add(folder)
                if filename != "task.json":
                    continue
                known.add(folder)
                if any(folder == p or folder.startswith(p + "/") for p in pending):
                    target = staging / folder / "task.json"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        for name in pending:
            if name not in known:
                raise DataError(_unknown_message(name, archive, known, folders))
        for src in sorted(staging.rglob("task.json"), key=lambda p: -len(p.parts)):
            dst = tasks_dir / src.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read {archive} ({err}); delete it and fetch again") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unknown_message(name: str, archive: Path, known: set[str], folders: set[str]) -> str:
    if name in folders:
        return (
            f"BIG-bench task {name!r} is programmatic (task.py, no task.json) and cannot be "
            "loaded; pick a JSON task"
        )
    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else "check the spelling"
    return f"no BIG-bench task {name!r} in {archive.name}; {hint}"
