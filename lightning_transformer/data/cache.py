"""Arrow caches: keys from file content, and Arrow files that appear whole or not at all."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

# Timestamps can be as coarse as 2 s, and a file changed again within that may keep its mtime;
# a content hash is only remembered for a file whose mtime is older.
SETTLED_S = 2.0


def cache_key(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def content_hash(path: Path, hashes: Path) -> str:
    """SHA-256 of the file's bytes, remembered under the file's identity so that unchanged files are read once."""
    stat = path.stat()
    # ctime moves on every write, even one that restores size and mtime afterwards.
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    remembered = hashes / cache_key([identity])
    if remembered.is_file():
        return remembered.read_text()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if time.time() - stat.st_mtime > SETTLED_S:
        hashes.mkdir(parents=True, exist_ok=True)
        partial_path = remembered.with_suffix(f".{os.getpid()}.tmp")
        partial_path.write_text(digest.hexdigest())
        partial_path.replace(remembered)
    return digest.hexdigest()


@contextmanager
def arrow_file(path: Path, schema: pa.Schema) -> Iterator[pa.RecordBatchStreamWriter]:
    """A writer of record batches into ``path``, which appears only if the block ends without an error.

    Written under another name then renamed, so a concurrent reader never sees half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(partial_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            yield writer
        partial_path.replace(path)
    finally:
        partial_path.unlink(missing_ok=True)
