"""Kernel images: tell a bzImage from an ELF vmlinux, and extract the vmlinux inside a bzImage.

vmmpy boots both kinds as given (``--kernel``). A bzImage first runs its own decompressor, which
on hosts where guest supervisor code is instruction-emulated (the nested PVM hosts vmmpy is
developed on) takes minutes; the ELF vmlinux inside it starts at once. This module gets that
vmlinux out::

    python -m vmmpy.kernel info /boot/vmlinuz
    python -m vmmpy.kernel extract /boot/vmlinuz vmlinux

A bzImage's protected-mode part carries the compressed kernel at ``payload_offset`` for
``payload_length`` bytes (boot protocol 2.08+), followed by the uncompressed size as a 32-bit
little-endian number. Debian's cloud kernel uses LZ4 (the legacy frame format that ``lz4 -l``
writes: a magic number, then blocks of at most 8 MiB, each preceded by its compressed size), the
generic one XZ. Decompression uses the standard library (``lzma``, ``gzip``, ``bz2``) and the
``lz4`` package; zstd needs Python 3.14's ``compression.zstd``; LZO is not supported.
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field

from vmmpy.errors import PayloadError

__all__ = ["KernelInfo", "inspect", "inspect_bytes", "extract_vmlinux", "describe", "main"]

HDRS_MAGIC = b"HdrS"
ELF_MAGIC = b"\x7fELF"
XLF_KERNEL_64 = 1
EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20

#: Payload magic numbers, as the kernel's build writes them (scripts/Makefile.lib).
COMPRESSION_MAGIC = [
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x89LZO", "lzo"),
    (struct.pack("<I", LZ4_LEGACY_MAGIC), "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (ELF_MAGIC, "none"),
]


@dataclass
class KernelInfo:
    """What a kernel file is. ``kind`` is ``bzimage`` or ``elf`` (the names ``vm.info`` uses in
    ``payload_kind``)."""

    kind: str
    size: int
    #: bzImage: boot protocol as "2.15"; kernel version string; payload compression.
    protocol: str | None = None
    version: str | None = None
    compression: str | None = None
    entry64: bool = False
    init_size: int | None = None
    cmdline_max: int | None = None
    #: ELF: entry point, and the PVH (Xen PHYS32_ENTRY) entry if the kernel has that note.
    entry: int | None = None
    pvh_entry: int | None = None
    load_end: int | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.kind == "bzimage":
            parts = [f"boot protocol {self.protocol}"]
            parts.append("64-bit entry" if self.entry64 else "no 64-bit entry")
            if self.compression:
                parts.append(f"{self.compression} payload")
            text = f"bzImage ({', '.join(parts)})"
        else:
            parts = [f"entry {self.entry:#x}" if self.entry is not None else "no entry"]
            if self.pvh_entry is not None:
                parts.append(f"PVH note {self.pvh_entry:#x}")
            text = f"ELF vmlinux ({', '.join(parts)})"
        if self.version:
            text += f", version {self.version.split()[0]}"
        return text


def _u16(b: bytes, o: int) -> int:
    return struct.unpack_from("<H", b, o)[0]


def _u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


def _u64(b: bytes, o: int) -> int:
    return struct.unpack_from("<Q", b, o)[0]


def _is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and data[0x202:0x206] == HDRS_MAGIC


def _setup_size(data: bytes) -> int:
    return ((data[0x1F1] or 4) + 1) * 512


def _payload(data: bytes, name: str) -> bytes:
    """The compressed kernel inside a bzImage, with the size the kernel build appended."""
    version = _u16(data, 0x206)
    if version < 0x0208 or len(data) < 0x250:
        raise PayloadError(
            f"{name}: boot protocol {version >> 8}.{version & 0xFF:02} has no payload fields (needs 2.08)"
        )
    pm = _setup_size(data)
    offset, length = _u32(data, 0x248), _u32(data, 0x24C)
    start, end = pm + offset, pm + offset + length
    if end > len(data) or length < 8:
        raise PayloadError(f"{name}: truncated: the compressed kernel ends at byte {end}, the file has {len(data)}")
    return data[start:end]


def _compression(payload: bytes) -> str:
    for magic, kind in COMPRESSION_MAGIC:
        if payload.startswith(magic):
            return kind
    return "unknown"


def _bz_version(data: bytes) -> str | None:
    ptr = _u16(data, 0x20E)
    if not ptr:
        return None
    at = ptr + 0x200
    text = data[at : at + 256].split(b"\0")[0]
    return text.decode("ascii", "replace") or None


def _elf_info(data: bytes, name: str) -> KernelInfo:
    info = KernelInfo(kind="elf", size=len(data))
    if len(data) < 64:
        raise PayloadError(f"{name}: truncated ELF header ({len(data)} bytes)")
    if data[4] != 2 or data[5] != 1 or _u16(data, 18) != EM_X86_64:
        raise PayloadError(f"{name}: not a 64-bit little-endian x86-64 ELF image")
    info.entry = _u64(data, 24)
    phoff, phentsize, phnum = _u64(data, 32), _u16(data, 54), _u16(data, 56)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(data):
            raise PayloadError(f"{name}: truncated program header table")
        ptype, off, paddr, filesz, memsz = (
            _u32(data, at),
            _u64(data, at + 8),
            _u64(data, at + 24),
            _u64(data, at + 32),
            _u64(data, at + 40),
        )
        if ptype == PT_LOAD:
            info.load_end = max(info.load_end or 0, paddr + memsz)
        elif ptype == PT_NOTE and off + filesz <= len(data):
            notes = data[off : off + filesz]
            pos = 0
            while pos + 12 <= len(notes):
                namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                nstart = pos + 12
                dstart = nstart + (namesz + 3) // 4 * 4
                nxt = dstart + (descsz + 3) // 4 * 4
                if nxt > len(notes):
                    break
                owner = notes[nstart : nstart + namesz].rstrip(b"\0").decode("ascii", "replace")
                info.notes.append(f"{owner}/{ntype}")
                if owner == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz >= 4:
                    info.pvh_entry = _u32(notes, dstart)
                pos = nxt
    # A Linux vmlinux keeps its banner in .rodata.
    at = data.find(b"Linux version ")
    if at >= 0:
        info.version = data[at + 14 : at + 200].split(b" ")[0].decode("ascii", "replace")
    return info


def inspect_bytes(data: bytes, name: str = "kernel") -> KernelInfo:
    """What kind of kernel `data` is. Raises PayloadError for anything that is not a kernel."""
    try:
        return _inspect(data, name)
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise PayloadError(f"{name}: truncated or malformed kernel header ({e})") from None


def _inspect(data: bytes, name: str) -> KernelInfo:
    if data[:4] == ELF_MAGIC:
        return _elf_info(data, name)
    if _is_bzimage(data):
        version = _u16(data, 0x206)
        info = KernelInfo(kind="bzimage", size=len(data), protocol=f"{version >> 8}.{version & 0xFF:02}")
        info.version = _bz_version(data)
        if len(data) >= 0x268:
            info.entry64 = version >= 0x020C and bool(_u16(data, 0x236) & XLF_KERNEL_64)
            info.cmdline_max = _u32(data, 0x238)
            info.init_size = _u32(data, 0x260)
        try:
            info.compression = _compression(_payload(data, name))
        except PayloadError:
            info.compression = None
        return info
    if not data:
        raise PayloadError(f"{name}: the file is empty")
    raise PayloadError(f"{name}: not a kernel: neither an ELF vmlinux nor a bzImage")


def inspect(path: str | os.PathLike) -> KernelInfo:
    with open(path, "rb") as f:
        return inspect_bytes(f.read(), os.fspath(path))


def describe(path: str | os.PathLike) -> str:
    """One line about the kernel at `path` (what the CLI prints); never raises."""
    try:
        return inspect(path).summary()
    except (OSError, PayloadError) as e:
        return f"unrecognised ({e})"


def _unlz4_legacy(payload: bytes, name: str) -> bytes:
    import lz4.block  # the `lz4` package (PyPI)

    out = []
    pos = 4  # the magic number
    while pos + 4 <= len(payload):
        size = _u32(payload, pos)
        if size == LZ4_LEGACY_MAGIC:  # concatenated streams
            pos += 4
            continue
        if pos + 4 + size > len(payload):
            break  # what is left is the 4-byte uncompressed size the kernel build appends
        try:
            out.append(lz4.block.decompress(payload[pos + 4 : pos + 4 + size], uncompressed_size=LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as e:
            raise PayloadError(f"{name}: corrupt LZ4 block at payload offset {pos}: {e}") from None
        pos += 4 + size
    return b"".join(out)


def _decompress(kind: str, payload: bytes, name: str) -> bytes:
    try:
        if kind == "lz4":
            return _unlz4_legacy(payload, name)
        if kind in ("xz", "lzma"):
            dec = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
            return dec.decompress(payload)  # the appended size is left in dec.unused_data
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(payload)
        if kind == "zstd":
            try:
                from compression import zstd  # Python 3.14+
            except ImportError:
                raise PayloadError(f"{name}: a zstd-compressed kernel needs Python 3.14's compression.zstd") from None
            return zstd.ZstdDecompressor().decompress(payload)
        if kind == "none":
            return payload
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError) as e:
        raise PayloadError(f"{name}: corrupt {kind} payload: {e}") from None
    raise PayloadError(f"{name}: cannot decompress a {kind} payload (vmmpy reads lz4, xz, lzma, gzip, bzip2, zstd)")


def extract_vmlinux(data: bytes, name: str = "kernel") -> bytes:
    """The ELF vmlinux inside the bzImage `data`, checked against the size the build recorded."""
    try:
        return _extract(data, name)
    except (struct.error, IndexError) as e:
        raise PayloadError(f"{name}: truncated or malformed bzImage ({e})") from None


def _extract(data: bytes, name: str) -> bytes:
    if data[:4] == ELF_MAGIC:
        raise PayloadError(f"{name}: already an ELF vmlinux")
    if not _is_bzimage(data):
        raise PayloadError(f"{name}: not a bzImage")
    payload = _payload(data, name)
    kind = _compression(payload)
    vmlinux = _decompress(kind, payload, name)
    expected = _u32(payload, len(payload) - 4)
    if len(vmlinux) != expected:
        raise PayloadError(f"{name}: {kind} payload gave {len(vmlinux)} bytes, the bzImage says {expected}")
    if vmlinux[:4] != ELF_MAGIC:
        raise PayloadError(f"{name}: the decompressed kernel is not an ELF image")
    return vmlinux


def extract_file(src: str | os.PathLike, dst: str | os.PathLike) -> KernelInfo:
    """Writes the vmlinux inside bzImage `src` to `dst` (atomically) and returns what it is."""
    with open(src, "rb") as f:
        data = f.read()
    vmlinux = extract_vmlinux(data, os.fspath(src))
    tmp = f"{os.fspath(dst)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(vmlinux)
    os.replace(tmp, dst)
    return inspect_bytes(vmlinux, os.fspath(dst))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmmpy.kernel", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="say what kind of kernel a file is")
    pi.add_argument("kernel")
    pe = sub.add_parser("extract", help="write the ELF vmlinux inside a bzImage to OUT")
    pe.add_argument("bzimage")
    pe.add_argument("out")
    args = p.parse_args(argv)
    try:
        if args.cmd == "info":
            info = inspect(args.kernel)
            print(f"{args.kernel}: {info.summary()}")
        else:
            info = extract_file(args.bzimage, args.out)
            print(f"{args.out}: {info.summary()}, {info.size} bytes")
    except (OSError, PayloadError) as e:
        print(f"vmmpy.kernel: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
