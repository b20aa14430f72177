"""The file tier of HiCache (L3, `--hicache-storage-backend file`): one file per KV page in a directory.

A page is named by a hash chain: key_0 = H(model identity), key_i = H(key_{i-1} || tokens of page i). So a
page's name depends on every token before it and on the model (config, dtype, KV dtype, page size, TP
rank): a restarted server, or a second one given the same directory, finds exactly the pages that are
valid for its prefixes and never another model's.

Files are written under a temporary name and renamed into place, so a reader never sees a torn page; each
carries its key, its payload size and a CRC32 of the payload, and a page whose size, key or checksum does
not match is a miss (and is removed, so it can be written again), never served. Reads and writes run on a
background thread; the scheduler hands over bytes it has already copied out of the host pool.
"""
from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)
MAGIC = b"RSKVPG01"
HEADER = struct.Struct("<8s32sQI")  # magic, key, payload bytes, crc32
SUPPORTED_BACKENDS = ("file",)


def identity_key(identity: dict) -> bytes:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).digest()


def chain_keys(parent: bytes, tokens: list[int], page_size: int) -> list[bytes]:
    """Keys of the whole pages of `tokens` that follow a page whose key is `parent`."""
    keys = []
    for i in range(0, len(tokens) // page_size * page_size, page_size):
        parent = hashlib.sha256(parent + array.array("q", tokens[i:i + page_size]).tobytes()).digest()
        keys.append(parent)
    return keys


@dataclass
class PrefetchOp:
    """Pages read in order until the first miss; `pages` grows while the thread works, so a best-effort
    admission can take the prefix that is already there."""

    keys: list[bytes]
    start: int  # token position of the first page
    pages: list[bytes] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    started: float = field(default_factory=time.monotonic)


class FileStorage:
    def __init__(self, root: str, page_nbytes: int) -> None:
        self.root = root
        self.page_nbytes = page_nbytes
        os.makedirs(root, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hicache-file")
        self.lock = threading.Lock()
        self.written: set[bytes] = set()  # keys this process knows are on disk (skip rewriting them)
        self.pending: set[Future] = set()
        self.pages_written = self.pages_read = self.corrupt_pages = 0

    def path(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.root, h[:2], h + ".kv")

    def exists(self, key: bytes) -> bool:
        return key in self.written or os.path.exists(self.path(key))

    # ---- writes -----------------------------------------------------------------------------------
    def write_async(self, key: bytes, data: bytes) -> None:
        if key in self.written:
            return
        self.written.add(key)
        fut = self.pool.submit(self._write, key, data)
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)

    def _write(self, key: bytes, data: bytes) -> None:
        path = self.path(key)
        if os.path.exists(path):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, key, len(data), zlib.crc32(data)))
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning(f"HiCache file storage: cannot write {path} ({e})")
            self.written.discard(key)
            if os.path.exists(tmp):
                os.unlink(tmp)
            return
        with self.lock:
            self.pages_written += 1

    def flush(self) -> None:
        """Wait for every write in flight (tests, shutdown)."""
        for fut in list(self.pending):
            fut.result()

    # ---- reads ------------------------------------------------------------------------------------
    def read(self, key: bytes) -> bytes | None:
        """The page's payload, or None when it is missing, truncated or corrupted."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError:
            return None
        ok = len(blob) == HEADER.size + self.page_nbytes
        if ok:
            magic, k, n, crc = HEADER.unpack_from(blob)
            data = blob[HEADER.size:]
            ok = magic == MAGIC and k == key and n == len(data) and zlib.crc32(data) == crc
        if not ok:
            logger.warning(f"HiCache file storage: {path} is truncated or corrupted; treated as a miss")
            with self.lock:
                self.corrupt_pages += 1
            self.written.discard(key)
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        with self.lock:
            self.pages_read += 1
        return data

    def prefetch(self, keys: list[bytes], start: int) -> PrefetchOp:
        op = PrefetchOp(keys, start)
        self.pool.submit(self._prefetch, op)
        return op

    def _prefetch(self, op: PrefetchOp) -> None:
        try:
            for key in op.keys:
                if op.cancelled:
                    break
                data = self.read(key)
                if data is None:
                    break
                op.pages.append(data)
        finally:
            op.done = True
