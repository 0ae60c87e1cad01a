"""RangeFile: reads only the blocks asked for (and ahead of sequential reads), keeps them in a
bounded LRU, fails short reads."""

from __future__ import annotations

import io
import os

import pytest

from vsphere_av import errors
from vsphere_av.scan.sources.rangefile import RangeFile

DATA = os.urandom(10 * 1024 + 123)


class Source:
    """A read_range over bytes that records every call."""

    def __init__(self, data: bytes = DATA, *, short: bool = False) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []
        self.short = short

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        out = self.data[offset:offset + length]
        return out[:-1] if self.short else out


def test_reads_return_the_bytes_at_any_offset() -> None:
    f = RangeFile(Source(), len(DATA), block_size=1024, cache_blocks=4)
    for offset, n in [(0, 10), (1000, 100), (5000, 3000), (len(DATA) - 5, 100), (len(DATA), 1)]:
        f.seek(offset)
        assert f.read(n) == DATA[offset:offset + n]
    f.seek(-3, io.SEEK_END)
    assert f.read() == DATA[-3:]
    assert f.tell() == len(DATA)


def test_only_the_blocks_asked_for_are_fetched_and_a_read_is_one_call() -> None:
    src = Source()
    f = RangeFile(src, len(DATA), block_size=1024, cache_blocks=8, max_fetch_blocks=8)
    f.seek(2100)
    assert f.read(2000) == DATA[2100:4100]
    assert src.calls == [(2048, 3072)]          # blocks 2..4 in one call
    f.seek(2500)
    f.read(100)                                  # cached: no call
    assert len(src.calls) == 1
    stats = f.statistics()
    # blocks 3 and 4 came with 2 and are then served from the cache, as is the re-read
    assert (stats.calls, stats.bytes_fetched, stats.misses, stats.hits) == (1, 3072, 3, 3)


def test_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    src = Source()
    f = RangeFile(src, len(DATA), block_size=1024, cache_blocks=2, readahead_blocks=0)
    for block in (0, 1, 0, 2):                   # 1 is the least recently used when 2 comes
        f.seek(block * 1024)
        f.read(1)
    assert f.statistics().cached_blocks == 2
    f.seek(0)
    f.read(1)
    assert len(src.calls) == 3                   # 0 still cached
    f.seek(1024)
    f.read(1)
    assert len(src.calls) == 4                   # 1 was evicted


def test_a_miss_after_a_cached_block_reads_ahead_in_a_growing_window() -> None:
    data = os.urandom(64 * 1024)
    src = Source(data)
    f = RangeFile(src, len(data), block_size=1024, cache_blocks=64, max_fetch_blocks=64,
                  readahead_blocks=16)
    f.seek(10 * 1024)
    f.read(10)                                   # block 10: nothing cached before it
    assert src.calls == [(10 * 1024, 1024)]
    for offset in range(11 * 1024, 64 * 1024, 512):
        f.seek(offset)
        assert f.read(10) == data[offset:offset + 10]
    # A sequential stream: windows of 2, 4, 8, 16 (the limit) blocks, then 16 to the end.
    assert [n // 1024 for _, n in src.calls[1:]] == [2, 4, 8, 16, 16, 7]
    f.seek(40)
    f.read(10)                                   # random: block 0 only
    assert src.calls[-1] == (0, 1024)
    with pytest.raises(ValueError, match="readahead"):
        RangeFile(src, len(data), readahead_blocks=-1)


def test_a_large_read_is_split_at_the_fetch_limit() -> None:
    src = Source()
    f = RangeFile(src, len(DATA), block_size=1024, cache_blocks=16, max_fetch_blocks=3)
    assert f.read(len(DATA)) == DATA
    assert [length for _, length in src.calls] == [3072, 3072, 3072, 1024 + 123]


def test_a_short_answer_is_a_disk_image_error() -> None:
    f = RangeFile(Source(short=True), len(DATA), block_size=1024, name="vm-flat.vmdk")
    with pytest.raises(errors.DiskImageError, match=r"vm-flat\.vmdk: 1023 bytes at offset 0"):
        f.read(10)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        RangeFile(Source(), 10, block_size=0)
    f = RangeFile(Source(), 10)
    with pytest.raises(OSError, match="negative"):
        f.seek(-1)
