"""The versioned state document and snapshot directories.

One document describes a paused VM's state (all but memory). It is a snapshot's ``state.json``
and a migration's State payload. Its ``format_version`` is "MAJOR.MINOR" (docs/snapshot-format.md):

* a reader takes any document of its own major and a minor up to its own; every field a later
  minor added has a default here, so older documents restore;
* a document of a newer minor restores only if it carries no field this reader does not know
  (such a field would be silently dropped, so it is refused, never half-restored);
* another major is refused.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass

from . import _native
from .errors import InvalidConfig, VmmError
from .payload import PARTS, BootPayload, verify

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    from pathlib import Path

FORMAT_MAJOR = 1
FORMAT_MINOR = 4
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

# Top-level fields each minor version knows, and the defaults of those added after 1.0.
FIELDS_1_0 = {"format_version", "vmmpy_version", "vcpus", "machine", "devices"}
# 1.1: a guest reboot/power-off latched during a migration ("VmReboot" | "VmShutdown"); absent = none.
FIELDS_1_1 = FIELDS_1_0 | {"post_migration_lifecycle_event"}
# 1.2: the boot payload's parts in the snapshot directory, {part: {size, sha256}}; absent = none
# (the embedded test guest).
FIELDS_1_2 = FIELDS_1_1 | {"payload"}
# 1.3: virtio device state by device id (docs/snapshot-format.md); absent = a VM without virtio devices.
FIELDS_1_3 = FIELDS_1_2 | {"virtio_devices"}
# 1.4: no new field; config.json's memory.shared=false now means private RAM (before 1.4 it was
# written false for memfd RAM), so an older snapshot's RAM is built shared (`private_memory`).
KNOWN_FIELDS = FIELDS_1_3
#: Written by the native core (Vm.save_state); the other fields are this module's.
NATIVE_SECTIONS = frozenset({"vcpus", "machine", "devices", "virtio_devices"})
PRIVATE_MEMORY_MINOR = 4
DEFAULTS: dict[str, object] = {"post_migration_lifecycle_event": None, "payload": None}


def state_head(**extra) -> bytes:
    """The document's own fields as a JSON object: this format's version, vmmpy's, and the
    version-specific `extra` fields. Made apart from `encode_state` so that a migration makes it
    before it pauses the guest: inside the downtime, code that ran long ago (the JSON encoder)
    costs tens of microseconds on a nested host (README, the downtime paragraph)."""
    from . import __version__

    head = {"format_version": FORMAT_VERSION, "vmmpy_version": __version__}
    unknown = set(extra) - (KNOWN_FIELDS - NATIVE_SECTIONS - set(head))
    if unknown:
        raise ValueError(f"not version-specific fields of format {FORMAT_VERSION}: {sorted(unknown)}")
    head.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps(head).encode()


def encode_state(native: bytes, head: bytes) -> bytes:
    """The state document: `Vm.save_state()`'s native sections (one JSON object, written by the
    native core) after the fields of `head` (`state_head`)."""
    # Both are JSON objects: the head's fields, then the native sections, in one object.
    return head[:-1] + b"," + native[1:]


@dataclass
class DecodedState:
    native: _native.SavedState
    fields: dict  # fields beyond the native state, defaults filled in
    format_version: str

    @property
    def private_memory(self) -> bool:
        """Whether the snapshot's config.json memory.shared=false means private RAM (1.4 on)."""
        return int(self.format_version.split(".")[1]) >= PRIVATE_MEMORY_MINOR


def check_version(doc: dict) -> tuple[int, int]:
    version = doc.get("format_version")
    try:
        if not isinstance(version, str):
            raise ValueError(version)
        major, minor = (int(x) for x in version.split("."))
    except ValueError:
        raise InvalidConfig(f"state document has no valid format_version (got {version!r})") from None
    if major != FORMAT_MAJOR:
        raise InvalidConfig(f"state format {version} is not supported: this vmmpy reads {FORMAT_MAJOR}.x")
    if minor > FORMAT_MINOR:
        unknown = sorted(set(doc) - KNOWN_FIELDS)
        if unknown:
            raise InvalidConfig(
                f"state format {version} carries fields this vmmpy (format {FORMAT_VERSION}) "
                f"cannot honour: {', '.join(unknown)}"
            )
    return major, minor


def decode_state(document: bytes) -> DecodedState:
    """The state of a whole state document, parsed and checked before any VM is built (another
    major is refused as such, even when its sections do not parse). The native core parses it
    once and hands back the other fields."""
    try:
        native, rest = _native.parse_state(document)
    except InvalidConfig as e:
        malformed = e
    else:
        doc = json.loads(rest)
        check_version(doc)
        fields = {k: doc.get(k, default) for k, default in DEFAULTS.items()}
        fields["post_migration_lifecycle_event"] = _lifecycle_event(fields["post_migration_lifecycle_event"])
        return DecodedState(native, fields, doc["format_version"])
    # Another major (or no version) may explain what the native sections lack: that is the error.
    try:
        doc = json.loads(document)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        check_version(doc)
    raise malformed


def _lifecycle_event(value):
    """The latched guest event a document carries, checked (None: none)."""
    if value is None:
        return None
    from .lifecycle import PostMigrationLifecycleEvent  # here: the boot path never loads it

    try:
        return PostMigrationLifecycleEvent(value)
    except (ValueError, TypeError):
        known = ", ".join(e.value for e in PostMigrationLifecycleEvent)
        raise InvalidConfig(f"post_migration_lifecycle_event {value!r}: expected one of {known}") from None


# ---- snapshot directories ------------------------------------------------------------------

CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
JSON_MAX = 64 << 20


def memory_file(index: int) -> str:
    return f"memory-{index}.bin"


def payload_file(part: str) -> str:
    return f"payload-{part}.bin"


def parse_file_url(url: str) -> Path:
    path = url[len("file://") :] if url.startswith("file://") else url
    if "://" in path:
        raise InvalidConfig(f"snapshot URL {url!r}: only file:// URLs are supported")
    if not path:
        raise InvalidConfig(f"snapshot URL {url!r}: the directory path is empty")
    from pathlib import Path  # here, not at the top: a VMM that only boots never loads it

    return Path(path)


# Inside the directory nothing is followed: a planted symlink or FIFO is refused, never used.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# A path that cannot be used as asked is the client's to fix (400); anything else (disk full, I/O
# error, out of fds) is the host's failure (500). Both carry the errno and the path.
_CLIENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EEXIST,
        errno.EACCES,
        errno.EPERM,
        errno.ENAMETOOLONG,
        errno.EROFS,
        errno.ENXIO,
    }
)


def io_error(what: str, e: OSError) -> VmmError:
    cls = InvalidConfig if e.errno in _CLIENT_ERRNOS else VmmError
    return cls(f"{what}: {e.strerror or e}", e.errno)


class SnapshotDir:
    """A snapshot directory held open; its files are opened relative to it (the directory's own
    path is the caller's), created with O_EXCL and mode 0600, read only if they are regular files."""

    def __init__(self, path: Path, create: bool = False):
        self.path = path
        try:
            if create:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise io_error(f"snapshot {path}", e) from None

    def __enter__(self) -> "SnapshotDir":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def _fail(self, name: str, e: OSError) -> VmmError:
        return io_error(f"snapshot {self.path}: {name}", e)

    def open_read(self, name: str) -> int:
        """An fd of the regular file `name` in the directory (the caller closes it)."""
        try:
            fd = os.open(name, _READ, dir_fd=self.fd)
        except FileNotFoundError:
            raise InvalidConfig(f"snapshot {self.path}: missing {name}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InvalidConfig(f"snapshot {self.path}: {name} is not a regular file (a symlink)") from None
            raise self._fail(name, e) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidConfig(f"snapshot {self.path}: {name} is not a regular file")
        return fd

    def read(self, name: str, bound: int) -> bytes:
        fd = self.open_read(name)
        try:
            size = os.fstat(fd).st_size
            if size > bound:
                raise InvalidConfig(f"snapshot {self.path}: {name} of {size} bytes is over the bound of {bound}")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(bound + 1)
        finally:
            os.close(fd)
        if len(data) > bound:
            raise InvalidConfig(f"snapshot {self.path}: {name} grew past the bound of {bound}")
        return data

    def read_json(self, name: str) -> dict:
        try:
            doc = json.loads(self.read(name, JSON_MAX))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidConfig(f"snapshot {self.path}: malformed JSON in {name}: {e}") from None
        if not isinstance(doc, dict):
            raise InvalidConfig(f"snapshot {self.path}: {name} is not a JSON object")
        return doc

    def read_state(self) -> DecodedState:
        """state.json decoded; its errors name the file."""
        document = self.read(STATE_FILE, JSON_MAX)
        try:
            return decode_state(document)
        except InvalidConfig as e:
            raise InvalidConfig(f"snapshot {self.path}: {STATE_FILE}: {e}") from None

    def remove(self, name: str) -> None:
        """Removes the entry itself (a symlink, not its target), if there is one."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._fail(name, e) from None

    def create(self, name: str) -> int:
        """A new, empty file `name` (mode 0600) replacing any entry of that name; the caller closes it."""
        self.remove(name)
        try:
            return os.open(name, _CREATE, 0o600, dir_fd=self.fd)
        except OSError as e:  # something raced us to the name: it is not ours to write through
            raise self._fail(name, e) from None

    def write(self, name: str, data: bytes) -> None:
        """Writes `name` whole: into a new temporary file, then renamed over the old entry."""
        tmp = f"{name}.tmp"
        fd = self.create(tmp)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:  # disk full, I/O error: the host's failure
            raise self._fail(name, e) from None
        finally:
            os.close(fd)


def write_snapshot(directory: Path, config_api: dict, state_doc: bytes, vm, payload: BootPayload) -> None:
    """Writes config, state, payload content and memory of the paused `vm` into `directory`."""
    with SnapshotDir(directory, create=True) as d:
        # Over an older snapshot: it stops being complete before any of its files change.
        d.remove(STATE_FILE)
        for i, _ in enumerate(vm.memory_regions()):
            fd = d.create(memory_file(i))
            try:
                vm.save_memory(i, fd)
            finally:
                os.close(fd)
        parts = payload.parts()
        for part in PARTS:
            if part in parts:
                d.write(payload_file(part), parts[part])
            else:
                d.remove(payload_file(part))
        d.write(CONFIG_FILE, json.dumps(config_api, indent=1).encode())
        # state.json last: its presence marks a complete snapshot.
        d.write(STATE_FILE, state_doc)


def read_memory(d: SnapshotDir, vm) -> None:
    """Fills the RAM regions of `vm` (built with restore=True) from the directory's memory files."""
    for i, _ in enumerate(vm.memory_regions()):
        fd = d.open_read(memory_file(i))
        try:
            vm.load_memory(i, fd)
        finally:
            os.close(fd)


def read_payload(d: SnapshotDir, described: dict) -> BootPayload:
    """The payload parts the state document describes (already bounded), checked by size and digest."""
    parts = {}
    for part, expected in described.items():
        parts[part] = d.read(payload_file(part), expected["size"])
        verify(part, parts[part], expected)
    return BootPayload(**parts)
