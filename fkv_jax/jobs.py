"""Batch jobs: many videos generated in fixed batches, recorded in a manifest, resumable after a crash.

A job is a list of :class:`Video` (one per prompt and seed, prompt-major). It runs in fixed batches of
``batch_size`` videos (the last one padded with copies of its last video, so one compiled step serves every
batch); on several processes a batch is split over the ``data`` axis of the global mesh and each process
writes the videos of the rows it holds (:func:`fkv_jax.distributed.owned_rows`).

Two naming modes:

* **fresh** (default): ``<index>_<prompt>_seed<S>[_<tags>].mp4``, never overwriting a file (``-2``, ``-3``
  ... suffixes); every video is generated.
* **resume** (``--resume``): the same names without suffixes, so a rerun finds them again. A video is done
  when the manifest lists its file, prompt and seed and the file is there with the recorded size; done
  videos are skipped, the rest generated (a stale or truncated file of the same name is replaced). Files
  are renamed into place only when complete, and the manifest only lists complete files, so an interrupted
  job never counts a truncated mp4 as done.

The manifest (``manifest.jsonl`` in the output folder by default) has one JSON object per finished video:
``{"index", "prompt", "seed", "policy", "file", "bytes", "batch", "process", "seconds", "finished"}``;
process 0 rewrites it atomically (temp file + rename) after every batch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.jsonl"


class ManifestError(ValueError):
    """An unreadable manifest (names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Video:
    """One output video of a job."""

    index: int  # position in the job (prompt-major, then seed)
    prompt: str  # its prompt (the first one of a prompt schedule)
    seed: int
    path: Path
    item: Any = None  # what the generator needs beyond prompt and seed (e.g. a PromptSchedule)


def slug(text: str, max_len: int = 48) -> str:
    """A file-name part from a prompt: lower-case ASCII letters and digits joined by '-'."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "video"


def plan(
    items: Sequence[Any],
    seeds: Sequence[int],
    out_dir: Path,
    *,
    prompt_of: Callable[[Any], str] = str,
    tags: str = "",
    resume: bool = False,
) -> list[Video]:
    """One :class:`Video` per item and seed, named ``<item index>_<slug>_seed<S><tags>.mp4``. ``resume``: the
    names as they are; otherwise a name already on disk or used twice gets a ``-2``, ``-3`` ... suffix."""
    taken: set[Path] = set()
    out = []
    for i, item in enumerate(items):
        prompt = prompt_of(item)
        for seed in seeds:
            path = Path(out_dir) / f"{i:03d}_{slug(prompt)}_seed{seed}{tags}.mp4"
            if not resume:
                path = _unique(path, taken)
            out.append(Video(len(out), prompt, int(seed), path, item))
    return out


def _unique(path: Path, taken: set[Path]) -> Path:
    out, n = path, 1
    while out.exists() or out in taken:
        n += 1
        out = path.with_name(f"{path.stem}-{n}{path.suffix}")
    taken.add(out)
    return out


# ---- the manifest ---------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> list[dict]:
    """The entries of a manifest (``[]`` when there is none yet)."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise ManifestError(f"--manifest {path} is not a file")
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read --manifest {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"--manifest {path} line {n} is not JSON: {e.msg}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ManifestError(f'--manifest {path} line {n} is not an object with a "file"')
        entries.append(entry)
    return entries


def write_manifest(path: Path, entries: Sequence[dict]) -> Path:
    """Write ``entries`` as JSON lines, atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for e in entries:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a manifest is as readable as the videos
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def merge(entries: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """``entries`` with ``new`` added; an entry for the same file replaces the old one. Sorted by file."""
    by_file = {e["file"]: e for e in entries}
    by_file.update({e["file"]: e for e in new})
    return [by_file[k] for k in sorted(by_file)]


def is_done(video: Video, entry: dict | None, out_dir: Path) -> bool:
    """The manifest lists this video (same prompt and seed) and its file is there with the recorded size."""
    if entry is None or entry.get("prompt") != video.prompt or entry.get("seed") != video.seed:
        return False
    f = Path(out_dir) / entry["file"]
    try:
        return f.is_file() and f.stat().st_size == entry.get("bytes")
    except OSError:
        return False


def todo(videos: Sequence[Video], entries: Sequence[dict], out_dir: Path) -> list[Video]:
    """The videos a (resumed) job still has to make."""
    by_file = {e["file"]: e for e in entries}
    return [v for v in videos if not is_done(v, by_file.get(_rel(v.path, out_dir)), out_dir)]


def _rel(path: Path, out_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(out_dir))
    except ValueError:
        return str(path)


def batches(videos: Sequence[Video], batch_size: int) -> list[list[Video]]:
    return [list(videos[i : i + batch_size]) for i in range(0, len(videos), batch_size)]


def padded(group: Sequence[Video], batch_size: int) -> list[Video]:
    """A short last batch filled with copies of its last video (the compiled batch size stays the same)."""
    return list(group) + [group[-1]] * (batch_size - len(group))


def entry(video: Video, out_dir: Path, *, policy: str | None, batch: int, process: int, seconds: float) -> dict:
    """The manifest line of a finished video (its file must exist)."""
    return {
        "index": video.index,
        "prompt": video.prompt,
        "seed": video.seed,
        "policy": policy,
        "file": _rel(video.path, out_dir),
        "bytes": Path(video.path).stat().st_size,
        "batch": batch,
        "process": process,
        "seconds": round(seconds, 3),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def partial_path(path: Path) -> Path:
    """Where a video is written until it is complete (then renamed to ``path``)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial{path.suffix or '.mp4'}")


def run(
    videos: Sequence[Video],
    batch_size: int,
    generate_batch: Callable[[int, list[Video], int], tuple[list[Video], Any]],
    *,
    rt,
    out_dir: Path,
    manifest: Path | None,
    entries: Sequence[dict] = (),
    policy: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[Any]]:
    """Run ``videos`` in batches: ``generate_batch(k, padded_batch, n_real) -> (videos this process wrote,
    extra)``; it writes only rows below ``n_real`` (the rest are padding).

    After every batch process 0 gathers what every process wrote and rewrites the manifest (``manifest=None``:
    none is kept). Returns (the manifest entries on process 0, [] elsewhere; the ``extra`` of every batch)."""
    import time

    entries = list(entries)
    extras = []
    for k, group in enumerate(batches(videos, batch_size)):
        t0 = time.perf_counter()
        written, extra = generate_batch(k, padded(group, batch_size), len(group))
        extras.append(extra)
        dt = time.perf_counter() - t0
        keep = {v.index for v in group}
        mine = [
            entry(v, out_dir, policy=policy, batch=k, process=rt.process_id, seconds=dt)
            for v in written
            if v.index in keep
        ]
        reports = rt.gather_json(f"manifest/batch{k}", mine)
        if reports is not None:  # process 0
            entries = merge(entries, [e for r in reports for e in r])
            if manifest is not None:
                write_manifest(manifest, entries)
    return entries if rt.is_main else [], extras
