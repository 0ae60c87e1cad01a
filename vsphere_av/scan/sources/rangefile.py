"""A seekable read-only file over a ``read_range(offset, length)`` call, with a block cache.

Called by whoever opens a VMDK extent that is not a local file: the disk source's opener
wraps the datastore's HTTP ``Range`` GET (``/folder/...`` on the VM's ESXi host) in one of
these per extent, and ``scan.sources.disk`` reads it like any file. It calls nothing but the
``read_range`` it is given.

Reads are served in whole blocks (``block_size``) kept in a bounded LRU cache
(``cache_blocks``): file system metadata is read many times in small pieces, so re-reads
cost nothing, and neighbouring misses of one read are fetched in one call (at most
``max_fetch_blocks`` blocks), so a large sequential read is few calls. A miss just after a
cached block is taken for a sequential stream of reads (a file's data in small pieces, the
next file of a directory, VMDK grains one by one) and reads ahead: the following blocks
come in the same call, a window that starts at ``READAHEAD_START`` blocks and doubles at each
next miss of the same stream up to ``readahead_blocks``, so a long stream costs one call per
window instead of one per read (each call is an HTTP request and a vCenter service ticket)
while a few neighbouring metadata reads fetch little. Otherwise nothing is read that was not
asked for beyond rounding to whole blocks.
``statistics()`` says how many calls and bytes it took.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Callable
from dataclasses import dataclass

from vsphere_av import errors

DEFAULT_BLOCK_SIZE = 64 * 1024       # one VMDK grain
DEFAULT_CACHE_BLOCKS = 512            # 32 MiB with the default block size
DEFAULT_MAX_FETCH_BLOCKS = 128        # one call reads at most 8 MiB with the default size
DEFAULT_READAHEAD_BLOCKS = 128        # largest readahead window: 8 MiB with the default size
READAHEAD_START = 2                   # first window of a sequential stream, in blocks
READAHEAD_STREAMS = 64                # sequential streams whose window is remembered


@dataclass(frozen=True)
class RangeFileStats:
    """What a ``RangeFile`` cost so far."""

    calls: int            # read_range calls made
    bytes_fetched: int    # bytes those calls returned
    hits: int             # blocks served from the cache
    misses: int           # blocks that had to be fetched
    cached_blocks: int    # blocks held now


class RangeFile(io.RawIOBase):
    """Seekable read-only file whose bytes come from ``read_range(offset, length)``."""

    def __init__(self, read_range: Callable[[int, int], bytes], size: int, *,
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 cache_blocks: int = DEFAULT_CACHE_BLOCKS,
                 max_fetch_blocks: int = DEFAULT_MAX_FETCH_BLOCKS,
                 readahead_blocks: int = DEFAULT_READAHEAD_BLOCKS,
                 name: str = "") -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"size must not be negative: {size}")
        if block_size <= 0 or cache_blocks <= 0 or max_fetch_blocks <= 0:
            raise ValueError("block_size, cache_blocks and max_fetch_blocks must be positive")
        if readahead_blocks < 0:
            raise ValueError(f"readahead_blocks must not be negative: {readahead_blocks}")
        self._read_range = read_range
        self.size = size
        self.name = name
        self._block_size = block_size
        self._cache_blocks = cache_blocks
        self._max_fetch = min(max_fetch_blocks, cache_blocks)
        self._readahead = readahead_blocks
        # block a sequential stream will miss next -> the window it has grown to
        self._streams: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._pos = 0
        self._calls = 0
        self._fetched = 0
        self._hits = 0
        self._misses = 0

    def __repr__(self) -> str:
        return f"<RangeFile {self.name or '?'} size={self.size} pos={self._pos}>"

    # --- io.RawIOBase ---------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence: {whence}")
        if pos < 0:
            raise OSError(f"{self.name or 'range file'}: seek to negative offset {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        want = min(len(view), max(0, self.size - self._pos))
        done = 0
        while done < want:
            pos = self._pos + done
            index, skip = divmod(pos, self._block_size)
            block = self._block(index, end=self._pos + want)
            n = min(len(block) - skip, want - done)
            view[done:done + n] = block[skip:skip + n]
            done += n
        self._pos += done
        return done

    # --- cache ----------------------------------------------------------------------------

    def statistics(self) -> RangeFileStats:
        """Calls, bytes and cache use so far."""
        return RangeFileStats(calls=self._calls, bytes_fetched=self._fetched, hits=self._hits,
                              misses=self._misses, cached_blocks=len(self._cache))

    def _block(self, index: int, *, end: int) -> bytes:
        """Block ``index``; a miss also fetches the missing blocks up to offset ``end``."""
        block = self._cache.get(index)
        if block is not None:
            self._cache.move_to_end(index)
            self._hits += 1
            return block
        # The following blocks come in the same call while this read wants them, or up to
        # the readahead window when the block before is cached (a sequential stream): the
        # run ends at a cached block, at that point or at the fetch limit.
        last = (min(end, self.size) - 1) // self._block_size
        window = 0
        if self._readahead and index - 1 in self._cache:
            grown = self._streams.pop(index, 0)
            window = min(grown * 2 if grown else READAHEAD_START, self._readahead)
            last = min(max(last, index + window - 1), (self.size - 1) // self._block_size)
        count = 1
        while (count < self._max_fetch and index + count <= last
               and index + count not in self._cache):
            count += 1
        if window:
            self._streams[index + count] = window
            while len(self._streams) > READAHEAD_STREAMS:
                self._streams.popitem(last=False)
        offset = index * self._block_size
        length = min(count * self._block_size, self.size - offset)
        data = self._read_range(offset, length)
        self._calls += 1
        self._fetched += len(data)
        if len(data) != length:
            raise errors.DiskImageError(
                f"{self.name or 'range file'}: {len(data)} bytes at offset {offset} where "
                f"{length} were asked (file size {self.size}): truncated or changing")
        self._misses += count
        for i in range(count):
            self._store(index + i, data[i * self._block_size:(i + 1) * self._block_size])
        return data[:self._block_size]

    def _store(self, index: int, block: bytes) -> None:
        self._cache[index] = block
        self._cache.move_to_end(index)
        while len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
