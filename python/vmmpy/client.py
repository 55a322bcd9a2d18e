"""A small client for vmmpy's (and Cloud Hypervisor's) REST API on a Unix socket.

Requests return ``(status, body)``: the body decoded from JSON when it is JSON, else the text, or
``None`` when the answer has no body. HTTP errors are not raised; failing to connect is
(``FileNotFoundError``, ``ConnectionRefusedError``, ... from the socket layer).
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from vmmpy.api import API_ROOT


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` that connects to a Unix stream socket."""

    def __init__(self, socket_path: str, timeout: float | None = None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not None:
                sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """One connection per request; safe to share between threads."""

    def __init__(self, socket_path: str, timeout: float | None = 60.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | list | str | bytes | None = None) -> tuple[int, Any]:
        """Send ``method`` to ``path`` (``"vm.info"`` or ``"/api/v1/vm.info"``).

        A dict or list body is sent as JSON; str/bytes are sent as they are.
        """
        if not path.startswith("/"):
            path = API_ROOT + path
        headers = {"Accept": "application/json"}
        data: bytes | None = None
        if body is not None:
            if isinstance(body, (dict, list)):
                data = json.dumps(body, default=_to_json).encode()
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = bytes(body)
            headers["Content-Type"] = "application/json"
        conn = UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
            content_type = response.getheader("Content-Type", "")
        finally:
            conn.close()
        return status, _decode(raw, content_type)

    # -- one method per endpoint -----------------------------------------------------------

    def ping(self) -> tuple[int, Any]:
        return self.request("GET", "vmm.ping")

    def shutdown_vmm(self) -> tuple[int, Any]:
        return self.request("PUT", "vmm.shutdown")

    def create(self, config: Any) -> tuple[int, Any]:
        """``config``: a Cloud Hypervisor VmConfig dict, a ``VmConfig``, or raw JSON text."""
        if hasattr(config, "to_api"):
            config = config.to_api()
        return self.request("PUT", "vm.create", config)

    def boot(self) -> tuple[int, Any]:
        return self.request("PUT", "vm.boot")

    def pause(self) -> tuple[int, Any]:
        return self.request("PUT", "vm.pause")

    def resume(self) -> tuple[int, Any]:
        return self.request("PUT", "vm.resume")

    def reboot(self) -> tuple[int, Any]:
        return self.request("PUT", "vm.reboot")

    def shutdown(self) -> tuple[int, Any]:
        return self.request("PUT", "vm.shutdown")

    def delete(self) -> tuple[int, Any]:
        return self.request("PUT", "vm.delete")

    def power_button(self) -> tuple[int, Any]:
        return self.request("PUT", "vm.power-button")

    def info(self) -> tuple[int, Any]:
        return self.request("GET", "vm.info")


def _to_json(obj: Any) -> Any:
    to_api = getattr(obj, "to_api", None)
    if callable(to_api):
        return to_api()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    text = raw.decode("utf-8", errors="replace")
    if "json" in content_type.lower() or text.lstrip()[:1] in ("{", "[", '"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def error_message(body: Any) -> str:
    """A one-line message from an error body (a list of strings, as CH and vmmpy send)."""
    if body is None:
        return ""
    if isinstance(body, list):
        return ": ".join(str(part) for part in body)
    if isinstance(body, str):
        return " ".join(body.split())
    return json.dumps(body)
