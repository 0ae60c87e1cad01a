"""Quarantine: keep the exact bytes of removed files where they cannot run or be picked up.

Called by ``scan.job`` (store a detected file's bytes before it is deleted in the guest)
and ``app`` (list, restore, purge). Calls the file system under
``<state_dir>/quarantine/`` (made private by ``files``) and ``StateStore`` for the
records.

Each item is one blob ``<id>.qbin``: the original bytes XOR-ed with a random 32-byte key
kept in the state database. The blob is never a runnable or scannable copy of the malware
(no executable bits, mode 0600 in a 0700 directory, and the bytes are scrambled so another
scanner or an accidental double-click does not trigger on them). The SHA-256 of the
original bytes is computed while storing and checked again on every read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from vsphere_av.errors import StoreError
from vsphere_av.files import private_dir, private_file
from vsphere_av.models import QuarantineId, QuarantineItem, VmId
from vsphere_av.store.state import StateStore, now_iso

KEY_LEN = 32
CHUNK = 64 * 1024


def _xor(data: bytes, key: bytes, offset: int) -> bytes:
    """XOR ``data`` with the repeating ``key`` starting at stream position ``offset``."""
    n = len(data)
    if not n:
        return data
    k = len(key)
    start = offset % k
    stream = (key[start:] + key * (n // k + 2))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


class BlobReader:
    """Reads a quarantined blob back as the original bytes; verifies the SHA-256 at the end."""

    def __init__(self, path: Path, item: QuarantineItem) -> None:
        self._fh = path.open("rb")
        self._item = item
        self._pos = 0
        self._digest = hashlib.sha256()

    def __len__(self) -> int:
        return self._item.size

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` original bytes (a chunk when ``size`` < 0)."""
        raw = self._fh.read(CHUNK if size is None or size < 0 else size)
        out = _xor(raw, self._item.key, self._pos)
        self._pos += len(raw)
        self._digest.update(out)
        if (not raw and self._pos == self._item.size
                and self._digest.hexdigest() != self._item.sha256):
            raise StoreError(f"quarantine item {self._item.id} is corrupt (SHA-256 mismatch)")
        return out

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk
        self.read(CHUNK)     # the empty read at the end runs the digest check

    def close(self) -> None:
        """Close the blob file."""
        self._fh.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Quarantine:
    """The quarantine of one state directory."""

    def __init__(self, *, root: Path, store: StateStore) -> None:
        self.root = root
        self._store = store

    @classmethod
    def open(cls, state_dir: Path | str, *, store: StateStore) -> Quarantine:
        """Quarantine under ``<state_dir>/quarantine`` (0700, its blobs 0600, also when an
        earlier version left them looser)."""
        root = private_dir(Path(state_dir) / "quarantine")
        for blob in root.iterdir():
            private_file(blob)
        return cls(root=root, store=store)

    def __repr__(self) -> str:
        return f"Quarantine({str(self.root)!r})"

    def _blob(self, item_id: str) -> Path:
        if not item_id.isalnum():
            raise StoreError(f"not a quarantine id: {item_id!r}")
        return self.root / f"{item_id}.qbin"

    def put(self, chunks: Iterable[bytes], *, vm_moref: VmId, vm_name: str, guest_path: str,
            threat: str, is_windows: bool = False, permissions: int | None = None,
            max_size: int | None = None) -> QuarantineItem:
        """Store a file's bytes (streamed, bounded by ``max_size``) and record it."""
        item_id = QuarantineId(secrets.token_hex(6))
        key = secrets.token_bytes(KEY_LEN)
        final = self._blob(item_id)
        tmp = final.with_suffix(".part")
        digest = hashlib.sha256()
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    if max_size is not None and size + len(chunk) > max_size:
                        raise StoreError(
                            f"{guest_path}: larger than the quarantine limit of {max_size} bytes")
                    digest.update(chunk)
                    fh.write(_xor(chunk, key, size))
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        # Idempotent across a crash between storing and deleting in the guest (controller,
        # issue 5 point 8): the same bytes from the same VM path, still held, are one item.
        for held in self._store.quarantine_items():
            if (held.vm_moref == vm_moref and held.guest_path == guest_path
                    and held.sha256 == digest.hexdigest() and not held.restored_at):
                final.unlink(missing_ok=True)
                return held
        item = QuarantineItem(id=item_id, vm_moref=vm_moref, vm_name=vm_name, guest_path=guest_path,
                              threat=threat, sha256=digest.hexdigest(), size=size, time=now_iso(),
                              is_windows=is_windows, permissions=permissions, key=key)
        try:
            self._store.add_quarantine(item)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return item

    def discard(self, item_id: str) -> None:
        """Forget an item whose guest-side removal failed (its file is still in the guest)."""
        self._blob(item_id).unlink(missing_ok=True)
        self._store.delete_quarantine(item_id)

    def items(self, *, include_purged: bool = False) -> list[QuarantineItem]:
        """All quarantine records, oldest first."""
        return self._store.quarantine_items(include_purged=include_purged)

    def get(self, item_id: str) -> QuarantineItem:
        """One live item; StoreError when unknown or purged."""
        item = self._store.quarantine_item(item_id)
        if item is None:
            raise StoreError(f"no quarantine item {item_id!r}")
        if item.purged_at:
            raise StoreError(f"quarantine item {item_id} was purged at {item.purged_at}")
        if not self._blob(item_id).is_file():
            raise StoreError(f"quarantine item {item_id}: its stored bytes are missing")
        return item

    def reader(self, item_id: str) -> BlobReader:
        """A reader of the original bytes (close it, or use it as a context manager)."""
        item = self.get(item_id)
        return BlobReader(self._blob(item_id), item)

    def mark_restored(self, item_id: str) -> None:
        """Stamp the item as put back in the guest (the bytes stay until purged)."""
        self._store.mark_quarantine(item_id, restored=True)

    def purge(self, item_id: str) -> QuarantineItem:
        """Delete the stored bytes for good; the record stays, stamped purged."""
        item = self.get(item_id)
        self._blob(item_id).unlink(missing_ok=True)
        self._store.mark_quarantine(item_id, purged=True)
        return item
