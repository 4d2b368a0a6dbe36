"""TLS credentials from the settings' PEM files, re-read when the files change.

cert-manager (or anyone) rotates certificates by replacing the files; servers pick the new ones
up at the next connection's handshake, clients when they next open a channel.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import grpc

from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings

log = logging.getLogger(__name__)

# Per file: (mtime, inode, size). Kubernetes swaps a Secret volume's files through a symlink,
# which changes the inode even when the mtime would not.
Signature = tuple[tuple[int, int, int], ...]


def signature(paths: tuple[Path, ...]) -> Signature | None:
    """What identifies the files' current versions; None while one is missing (mid-rotation)."""
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return tuple((s.st_mtime_ns, s.st_ino, s.st_size) for s in stats)


def read_pem(path: Path, what: str) -> bytes:
    """A PEM file's bytes, or InvalidInput naming the setting and the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise InvalidInput(f"{what} {path}: not a PEM file")
    return data


def _paths(settings: Settings) -> tuple[Path, ...]:
    """Certificate, key and (when set) CA file, in that order."""
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    ca = (settings.tls_ca_file,) if settings.tls_ca_file is not None else ()
    return (settings.tls_cert_file, settings.tls_key_file, *ca)


def _read_all(settings: Settings) -> tuple[bytes, bytes, bytes | None]:
    """(certificate chain, private key, CA bundle or None) from the settings' files."""
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    cert = read_pem(settings.tls_cert_file, "tls_cert_file")
    key = read_pem(settings.tls_key_file, "tls_key_file")
    ca = read_pem(settings.tls_ca_file, "tls_ca_file") if settings.tls_ca_file else None
    return cert, key, ca


class ServerCertificates:
    """The server's certificate configuration; `fetch` hands gRPC a new one after a rotation."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._paths = _paths(settings)
        self._lock = threading.Lock()  # gRPC calls `fetch` from its own threads
        self._seen = signature(self._paths)
        self.initial = self._config()

    def _config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = _read_all(self._settings)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called before every handshake: a new configuration when the files changed, else None."""
        with self._lock:
            now = signature(self._paths)
            if now is None or now == self._seen:
                return None
            self._seen = now
            try:
                config = self._config()
            except (InvalidInput, ValueError) as exc:
                # Keep the certificate in use; the next change of the files is tried again.
                log.warning("TLS files changed but cannot be used (%s); keeping the old ones", exc)
                return None
        log.info("TLS certificate reloaded from %s", self._settings.tls_cert_file)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,  # type: ignore[arg-type]  # the stub omits None ("no change"), gRPC allows it
            require_client_authentication=self._settings.tls_client_auth,
        )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Reloading TLS credentials for a server, or None for plaintext."""
    if not settings.tls_enabled():
        return None
    return ServerCertificates(settings).credentials()


class ClientCertificates:
    """A client's TLS credentials, and whether its files changed since they were read."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._paths = _paths(settings)
        self._seen: Signature | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Credentials from the files as they are now (their versions are remembered)."""
        self._seen = signature(self._paths)
        cert, key, ca = _read_all(self._settings)
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def changed(self) -> bool:
        """True once every file is present again and any differs from the last read."""
        now = signature(self._paths)
        return now is not None and now != self._seen

    def options(self) -> list[tuple[str, str]]:
        """Channel arguments: the server name to verify, when it is not the target's host."""
        name = self._settings.tls_server_name
        return [("grpc.ssl_target_name_override", name)] if name else []
