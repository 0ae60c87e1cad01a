"""The transfer pipeline's batches (``scan.sources.guest.Transfers`` with a ``BatchScanner``):
how queued files are grouped, results handed back in order, an outage ending the reads.

Pure Python: a file source whose files are read elsewhere (nothing comes here, as for a disk
read by the host's appliance) and a session that answers each file with its path. The
appliance itself is exercised in ``tests/integration/test_appliance_disk.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from vsphere_av import errors
from vsphere_av.models import GuestFile
from vsphere_av.scan.sources.guest import (
    BATCH_BYTES,
    BATCH_FILES,
    BatchScanner,
    Stream,
    Transfers,
)


class Elsewhere:
    """Downloads whose bytes never come here (``local`` False)."""

    local = False

    def __init__(self, size: int) -> None:
        self.size = size

    def chunks(self) -> Iterator[bytes]:
        raise AssertionError("read here")
        yield b""           # a generator: only reading it fails

    def close(self) -> None:
        pass


class Source:
    windows = False

    def __init__(self, files: Sequence[GuestFile]) -> None:
        self.sizes = {f.path: f.size for f in files}

    def walk(self, *args: Any, **kw: Any) -> Iterator[GuestFile]:
        raise AssertionError("not walked here")

    def open_download(self, path: str) -> Elsewhere:
        return Elsewhere(self.sizes[path])

    def delete_file(self, path: str) -> None:
        raise AssertionError("nothing is deleted")


class Scanner:
    """Answers each file with ``verdict <path>``; ``lost_at``: the outage from that path on."""

    version = 1

    def __init__(self, lost_at: str = "") -> None:
        self.calls: list[list[str]] = []
        self.lost_at = lost_at

    def scan_stream(self, chunks: Any, *, path: str, name: str | None = None,
                    owner: str = "", size_hint: int | None = None) -> Any:
        raise AssertionError("one by one")

    def scan_batch(self, streams: Sequence[Stream]) -> list[Any]:
        self.calls.append([s.path for s in streams])
        paths = [s.path for s in streams]
        cut = paths.index(self.lost_at) if self.lost_at in paths else len(paths)
        lost = errors.ConnectionLost("the appliance stopped")
        return [f"verdict {p}" for p in paths[:cut]] + [lost] * (len(paths) - cut)


def files(*sizes: int) -> list[GuestFile]:
    return [GuestFile(path=f"/f{i:03}", name=f"f{i:03}", type="file", size=size, mtime="")
            for i, size in enumerate(sizes)]


def run(entries: list[GuestFile], scanner: Scanner) -> list[Any]:
    assert isinstance(scanner, BatchScanner)
    transfers = Transfers(Source(entries), None, name="vm", enabled=True, batcher=scanner)
    try:
        with transfers._queued:           # all queued before the thread takes any
            for entry in entries:
                transfers.submit(entry)
        return [transfers.take() for _ in entries]
    finally:
        transfers.close()


def test_queued_files_go_in_batches_of_at_most_64_files_and_4_mib_in_walk_order() -> None:
    big = 3 * 1024 * 1024
    entries = files(big, big, big, *[100] * 100)
    scanner = Scanner()
    fetched = run(entries, scanner)
    assert [f.entry for f in fetched] == entries
    assert [f.outcome for f in fetched] == [f"verdict {e.path}" for e in entries]
    assert [len(call) for call in scanner.calls] == [1, 1, BATCH_FILES, 100 + 3 - 2 - 64]
    assert big + 63 * 100 <= BATCH_BYTES < 2 * big     # a larger file goes alone


def test_an_outage_in_a_batch_fails_that_file_and_every_later_one_without_reading_on() -> None:
    entries = files(*[100] * (BATCH_FILES + 10))
    scanner = Scanner(lost_at="/f010")
    fetched = run(entries, scanner)
    assert [f.outcome for f in fetched[:10]] == [f"verdict {e.path}" for e in entries[:10]]
    assert all(isinstance(f.error, errors.ConnectionLost) for f in fetched[10:])
    assert len(scanner.calls) == 1            # the next batch was not sent after the outage
