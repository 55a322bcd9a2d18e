"""The test guest's disk sector format (guest/pattern.c), read from the host side of an image file.

A sector is 64 little-endian u64 words: lba, generation, checksum, 61 fill words derived from lba
and generation; the checksum is a Fletcher-style sum of sums over every other word, so a torn
sector (parts of two writes) fails it.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

SECTOR = 512
WORDS = SECTOR // 8
_M = (1 << 64) - 1
_K1 = 0x9E3779B97F4A7C15
_K2 = 0xD6E8FEB86659FD93
_CK0 = 0x6A09E667F3BCC908
_FMT = f"<{WORDS}Q"


def sector(lba: int, gen: int) -> bytes:
    """The bytes the guest writes for `lba` in generation `gen`."""
    x = (lba * _K2 & _M) ^ ((gen + 1) * _K1 & _M)
    w = x ^ (x >> 29)
    a = (_CK0 + lba) & _M
    b = a
    a = (a + gen) & _M
    b = (b + a) & _M
    fill = []
    for _ in range(3, WORDS):
        w = (w + _K1) & _M
        fill.append(w)
        a = (a + w) & _M
        b = (b + a) & _M
    return struct.pack(_FMT, lba, gen, a ^ (b * _K2 & _M), *fill)


def parse(data: bytes, lba: int) -> int | None:
    """The generation of a whole sector written for `lba`; 0 for an all-zero sector; None for
    anything else (torn, misplaced, foreign data)."""
    if data == bytes(SECTOR):
        return 0
    got_lba, gen = struct.unpack_from("<2Q", data)
    if got_lba != lba or data != sector(lba, gen):
        return None
    return gen


def read_sectors(path: Path, start: int, count: int) -> list[bytes]:
    with open(path, "rb") as f:
        f.seek(start * SECTOR)
        data = f.read(count * SECTOR)
    assert len(data) == count * SECTOR, f"{path} is shorter than sector {start + count}"
    return [data[i * SECTOR : (i + 1) * SECTOR] for i in range(count)]


def generations(path: Path, start: int, count: int) -> list[int]:
    """Each sector's generation (0: never written); fails on the first sector that is not whole."""
    gens = []
    for i, data in enumerate(read_sectors(path, start, count)):
        gen = parse(data, start + i)
        assert gen is not None, f"{path}: sector {start + i} is torn or misplaced: {data[:24].hex()}"
        gens.append(gen)
    return gens


def make_image(path: Path, mib: int) -> Path:
    """A sparse raw image of `mib` MiB, all zeros."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
