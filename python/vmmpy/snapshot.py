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

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidConfig, VmmError

FORMAT_MAJOR = 1
FORMAT_MINOR = 1
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

# Top-level fields each minor version knows, and the defaults of those added after 1.0.
FIELDS_1_0 = {"format_version", "vmmpy_version", "vcpus", "machine", "devices"}
# 1.1: a guest reboot/power-off latched during a migration ("VmReboot" | "VmShutdown"); absent = none.
FIELDS_1_1 = FIELDS_1_0 | {"post_migration_lifecycle_event"}
KNOWN_FIELDS = FIELDS_1_1
DEFAULTS: dict[str, object] = {"post_migration_lifecycle_event": None}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def encode_state(native: dict, **extra) -> dict:
    """The JSON-ready document for `Vm.save_state()`'s dict plus version-specific `extra` fields."""
    from . import __version__

    vcpus = []
    for v in native["vcpus"]:
        d = {k: _b64(b) for k, b in v.items() if k != "msrs"}
        d["msrs"] = [[i, val] for i, val in v["msrs"]]
        vcpus.append(d)
    serial = dict(native["devices"]["serial"])
    serial["in_buffer"] = _b64(serial["in_buffer"])
    cmos = native["devices"]["cmos"]
    doc = {
        "format_version": FORMAT_VERSION,
        "vmmpy_version": __version__,
        "vcpus": vcpus,
        "machine": {k: _b64(b) for k, b in native["machine"].items()},
        "devices": {"serial": serial, "cmos": {"nvram": _b64(cmos["nvram"]), "index": cmos["index"]}},
    }
    unknown = set(extra) - KNOWN_FIELDS
    if unknown:
        raise ValueError(f"not fields of format {FORMAT_VERSION}: {sorted(unknown)}")
    doc.update({k: v for k, v in extra.items() if v is not None})
    return doc


@dataclass
class DecodedState:
    native: dict
    fields: dict  # fields beyond the native state, defaults filled in
    format_version: str


def check_version(doc: dict) -> tuple[int, int]:
    version = doc.get("format_version")
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise InvalidConfig(f"state document has no valid format_version (got {version!r})") from None
    if major != FORMAT_MAJOR:
        raise InvalidConfig(f"state format {version} is not supported: this vmmpy reads {FORMAT_MAJOR}.x")
    if minor > FORMAT_MINOR:
        unknown = sorted(set(doc) - KNOWN_FIELDS)
        if unknown:
            raise InvalidConfig(f"state format {version} carries fields this vmmpy (format {FORMAT_VERSION}) "
                                f"cannot honour: {', '.join(unknown)}")
    return major, minor


def decode_state(doc: dict) -> DecodedState:
    check_version(doc)
    try:
        vcpus = []
        for v in doc["vcpus"]:
            d = {k: _unb64(b) for k, b in v.items() if k != "msrs"}
            d["msrs"] = [(int(i), int(val)) for i, val in v["msrs"]]
            vcpus.append(d)
        serial = dict(doc["devices"]["serial"])
        serial["in_buffer"] = _unb64(serial["in_buffer"])
        cmos = doc["devices"]["cmos"]
        native = {
            "vcpus": vcpus,
            "machine": {k: _unb64(b) for k, b in doc["machine"].items()},
            "devices": {"serial": serial, "cmos": {"nvram": _unb64(cmos["nvram"]), "index": int(cmos["index"])}},
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InvalidConfig(f"malformed state document: {type(e).__name__}: {e}") from None
    fields = {k: doc.get(k, default) for k, default in DEFAULTS.items()}
    return DecodedState(native, fields, doc["format_version"])


# ---- snapshot directories ------------------------------------------------------------------

CONFIG_FILE = "config.json"
STATE_FILE = "state.json"


def memory_file(index: int) -> str:
    return f"memory-{index}.bin"


def parse_file_url(url: str) -> Path:
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url:
        raise InvalidConfig(f"snapshot URL {url!r}: only file:// URLs are supported")
    return Path(url)


def write_snapshot(directory: Path, config_api: dict, state_doc: dict, vm) -> None:
    """Writes config, state and memory of the paused `vm` into `directory`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a path under a regular file, no permission, ...: the client's to fix
        raise InvalidConfig(f"snapshot {directory}: cannot create the directory: {e.strerror}", e.errno) from None
    # Over an older snapshot: it stops being complete before any of its files change.
    (directory / STATE_FILE).unlink(missing_ok=True)
    for i, _ in enumerate(vm.memory_regions()):
        vm.save_memory(i, str(directory / memory_file(i)))
    _write_json(directory / CONFIG_FILE, config_api)
    # state.json last: its presence marks a complete snapshot.
    _write_json(directory / STATE_FILE, state_doc)


def read_snapshot(directory: Path) -> tuple[dict, dict]:
    docs = []
    for name in (CONFIG_FILE, STATE_FILE):
        try:
            doc = json.loads((directory / name).read_bytes())
        except FileNotFoundError:
            raise InvalidConfig(f"snapshot {directory}: missing {name}") from None
        except OSError as e:  # not a directory, not readable, ...
            raise InvalidConfig(f"snapshot {directory}: cannot read {name}: {e.strerror}", e.errno) from None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise InvalidConfig(f"snapshot {directory}: {name} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise InvalidConfig(f"snapshot {directory}: {name} is not a JSON object")
        docs.append(doc)
    config, state = docs
    return config, state  # decode_state checks the version, before anything is built


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        raise VmmError(f"snapshot: cannot write {path}: {e.strerror}", e.errno) from None
