"""Certificates for migration TLS tests, made with the openssl CLI the way docs/tls.md shows users."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def _openssl(cwd: Path, *args: str) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr}"


def make_ca(directory: Path, name: str) -> Path:
    """A CA key and self-signed certificate in `directory/name`; returns that directory."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed (Debian package openssl)")
    ca = directory / name
    ca.mkdir(parents=True)
    _openssl(
        ca,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
    )
    return ca


def make_tls_dir(ca: Path, directory: Path, side: str, ip: str) -> Path:
    """A tls_dir for `side` ("client" = source, "server" = destination): the CA's certificate and
    a key and certificate signed by the CA naming `ip`. Only the CA's certificate is copied. Both
    sides may share one directory (a VMM that sends and receives)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca / "ca-cert.pem", directory / "ca-cert.pem")
    (directory / "ext.cnf").write_text(f"subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n")
    _openssl(
        directory,
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        f"/CN={side}",
        "-keyout",
        f"{side}-key.pem",
        "-out",
        f"{side}.csr",
    )
    _openssl(
        directory,
        "x509",
        "-req",
        "-in",
        f"{side}.csr",
        "-CA",
        str(ca / "ca-cert.pem"),
        "-CAkey",
        str(ca / "ca-key.pem"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        f"{side}-cert.pem",
    )
    (directory / f"{side}-key.pem").chmod(0o600)
    return directory
