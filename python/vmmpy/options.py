"""Command-line option strings in Cloud Hypervisor's syntax, and vmmpy's one boolean rule for them.

Every ``key=value,...`` string vmmpy reads goes through here: ``vmmpy``'s flags (``--memory``,
``--disk``, ``--net``, ``--vsock``, ``--cpus``, ``--serial``, ``--restore``, ``--api-socket``,
``--event-monitor``, ``--test-hooks``) and ``vmmpy-remote``'s request options.

Syntax, as Cloud Hypervisor's option parser reads it: items are separated by commas; double quotes
protect commas inside a value and are removed (``file="/tmp/a,b.log"``); an item is ``key=value``
(split at the first ``=``) or a bare word.

Booleans on a command line: ``on`` or ``true`` is true, ``off`` or ``false`` is false, in any case
(Cloud Hypervisor's four words). Anything else, the empty value included, is refused naming the
option. A boolean in a JSON body (the REST API, a migration peer, a snapshot) is a JSON
``true``/``false`` and nothing else: :func:`vmmpy.config.read_request_body`.
"""

from __future__ import annotations

from vmmpy.errors import InvalidConfig

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    from typing import Iterable

TRUE_WORDS = ("on", "true")
FALSE_WORDS = ("off", "false")


def split_options(text: str, flag: str) -> list[tuple[str, str | None]]:
    """``a=1,b="x,y",c`` → ``[("a", "1"), ("b", "x,y"), ("c", None)]``."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidConfig(f"{flag} {text!r}: empty value")
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise InvalidConfig(f"{flag} {text!r}: unbalanced double quote")
    items.append("".join(current))
    out: list[tuple[str, str | None]] = []
    for item in items:
        if not item:
            raise InvalidConfig(f"{flag} {text!r}: empty option")
        key, sep, value = item.partition("=")
        out.append((key.strip(), value if sep else None))
    return out


def parse_options(
    text: str, flag: str, allowed: Iterable[str] | None, usage: str, bare: str | None = None
) -> dict[str, str]:
    """``key=value,...`` → ``{key: value}``; each key at most once, and one of `allowed` (None: any).

    `bare` names the key a first item sets when it is not ``key=value`` or is a URL (ch-remote's
    ``send-migration tcp:H:P,downtime_ms=300``, ``restore file:///DIR``).
    """
    known = None if allowed is None else tuple(allowed)
    out: dict[str, str] = {}
    for i, (key, value) in enumerate(split_options(text, flag)):
        if bare is not None and i == 0 and (value is None or ":" in key):
            key, value = bare, key if value is None else f"{key}={value}"
        if value is None:
            raise InvalidConfig(f"{flag} {text!r}: {key!r} has no value; expected {usage}")
        if known is not None and key not in known:
            raise InvalidConfig(f"{flag} {text!r}: unsupported option {key!r}; expected {usage}")
        if key in out:
            raise InvalidConfig(f"{flag} {text!r}: option {key!r} given twice")
        out[key] = value
    return out


def parse_bool(text: str, what: str) -> bool:
    """The command line's boolean: on|true → True, off|false → False (any case); else refused."""
    value = text.strip().lower() if isinstance(text, str) else ""
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise InvalidConfig(f"{what}={text!r}: expected on or off (or true/false)")


def parse_int(text: str, what: str) -> int:
    """A non-negative decimal integer."""
    value = text.strip() if isinstance(text, str) else ""
    if not (value.isascii() and value.isdigit()):
        raise InvalidConfig(f"{what}={text!r}: expected a number")
    return int(value)


def parse_size(text: str, what: str = "size") -> int:
    """``"512M"`` → bytes. Suffixes K, M, G (any case) are powers of 1024; no suffix = bytes."""
    s = text.strip() if isinstance(text, str) else ""
    shift = {"k": 10, "m": 20, "g": 30}.get(s[-1:].lower(), 0)
    digits = s[:-1] if shift else s
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidConfig(f"{what}={text!r}: not a size (expected <number>[K|M|G])")
    return int(digits) << shift


def parse_path_or_fd(text: str, flag: str) -> tuple[str | None, int | None]:
    """``path=PATH``, ``fd=N`` or a bare ``PATH`` → ``(path, fd)``, one of them None."""
    usage = f"{flag} {text!r}: expected path=PATH or fd=N"
    items = split_options(text, flag)
    if len(items) != 1:
        raise InvalidConfig(usage)
    key, value = items[0]
    if key == "fd" and value is not None:
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise InvalidConfig(f"{flag} fd={value!r}: not a file descriptor number")
        return None, int(value)
    path = value if key == "path" else key if value is None else None
    if not path or path == "fd" or "\0" in path:
        raise InvalidConfig(usage)
    return path, None
