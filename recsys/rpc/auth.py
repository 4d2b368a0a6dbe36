"""Who may write: the one decision on UpsertItems/DeleteItems callers, made before the servicer runs.

A caller's identity is its client certificate's CN and SANs (mTLS), else the NAME of the bearer
token it sends (`authorization: Bearer TOKEN`, matched in constant time against
write_tokens_file). A write needs an identity (else Unauthenticated) listed in write_identities
(else PermissionDenied). Reads are never checked here: with mTLS on, the handshake already
admitted only callers holding a certificate of the trusted CA.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from recsys.core import metrics
from recsys.core.errors import InvalidInput, PermissionDenied, Unauthenticated
from recsys.core.settings import Settings
from recsys.rpc.tls import Signature, signature

log = logging.getLogger(__name__)

# The mutating RPCs of every service; everything else is a read.
WRITE_METHODS = frozenset(
    {
        "/recsys.v1.RetrievalService/UpsertItems",
        "/recsys.v1.RetrievalService/DeleteItems",
    }
)
ANONYMOUS = "anonymous"  # the identity of writes while no write policy is configured
_CERT_NAMES = ("x509_common_name", "x509_subject_alternative_name")
_BEARER = "bearer "


def parse_tokens(text: str, path: Path) -> dict[str, bytes]:
    """NAME:TOKEN lines (blank lines and # comments skipped) → {name: token}."""
    tokens: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        # The message names the line, never its content: it may hold a secret.
        if not sep or not name or not token:
            raise InvalidInput(f"write_tokens_file {path} line {number}: expected NAME:TOKEN")
        if name in tokens:
            raise InvalidInput(f"write_tokens_file {path} line {number}: {name!r} appears twice")
        tokens[name] = token.encode()
    return tokens


class TokenFile:
    """The named bearer tokens of write_tokens_file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen = signature((path,))
        self._tokens = self._read()

    def _read(self) -> dict[str, bytes]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise InvalidInput(f"write_tokens_file {self.path}: {exc.strerror or exc}") from None
        return parse_tokens(text, self.path)

    def tokens(self) -> dict[str, bytes]:
        with self._lock:
            now = signature((self.path,))
            if now is not None and now != self._seen:
                self._reload(now)
            return self._tokens

    def _reload(self, now: Signature) -> None:
        self._seen = now
        try:
            self._tokens = self._read()
        except InvalidInput as exc:
            log.warning("%s; keeping the tokens read before", exc)
            return
        log.info("write tokens reloaded from %s (%d names)", self.path, len(self._tokens))

    def name_of(self, token: bytes) -> str | None:
        """The name whose token equals `token`, compared in constant time against each one."""
        found = None
        for name, known in self.tokens().items():
            if hmac.compare_digest(token, known):
                found = name  # no early exit: every token costs the same comparison
        return found


def certificate_names(auth: Mapping[str, Iterable[bytes]]) -> set[str]:
    """The CN and SANs of the peer's verified client certificate (empty without one)."""
    return {value.decode(errors="replace") for key in _CERT_NAMES for value in auth.get(key, [])}


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    """The token of an `authorization: Bearer TOKEN` metadata entry, if there is one."""
    for key, value in metadata or ():
        scheme = value[: len(_BEARER)].lower() if isinstance(value, str) else ""
        if key == "authorization" and scheme == _BEARER:
            return str(value[len(_BEARER) :]).strip().encode()
    return None


@dataclass(frozen=True)
class WritePolicy:
    """Identities allowed to write, and where bearer tokens come from."""

    identities: frozenset[str]
    tokens: TokenFile | None

    @classmethod
    def from_settings(cls, settings: Settings) -> WritePolicy:
        names = frozenset(n.strip() for n in settings.write_identities.split(",") if n.strip())
        path = settings.write_tokens_file
        return cls(names, TokenFile(path) if path is not None else None)

    @property
    def configured(self) -> bool:
        return bool(self.identities) or self.tokens is not None


class WriteAuthorizer:
    """Lets a write through only for an allowed identity; counts and logs every accepted one."""

    def __init__(self, settings: Settings) -> None:
        self.policy = WritePolicy.from_settings(settings)
        self._tls = settings.tls_enabled()

    @staticmethod
    def guards(full_service: str) -> bool:
        """Whether the service (e.g. recsys.v1.RetrievalService) has methods that write."""
        return any(m.startswith(f"/{full_service}/") for m in WRITE_METHODS)

    def describe(self) -> str:
        """One line for the start-up log: who may write and how callers authenticate."""
        policy = self.policy
        if not policy.configured:
            return "writes are UNAUTHENTICATED: anyone who can connect may upsert/delete items"
        ways = ["client certificate"] if self._tls else []
        if policy.tokens is not None:
            ways.append(f"bearer token from {policy.tokens.path}")
        allowed = ", ".join(sorted(policy.identities)) or "nobody (write_identities is empty)"
        return (
            f"writes allowed to {allowed}; callers identified by {' or '.join(ways) or 'nothing'}"
        )

    def identities(self, context: grpc.aio.ServicerContext) -> set[str]:
        """The caller's names: its certificate's, else its bearer token's; Unauthenticated if none."""
        names = certificate_names(context.auth_context())
        if names:
            return names
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Unauthenticated(
                "writes need a client certificate or `authorization: Bearer TOKEN` metadata"
            )
        tokens = self.policy.tokens
        name = tokens.name_of(token) if tokens is not None else None
        if name is None:
            raise Unauthenticated("the bearer token is not one of the configured write tokens")
        return {name}

    def check(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Returns for reads and allowed writes; raises Unauthenticated or PermissionDenied."""
        if method not in WRITE_METHODS:
            return
        identity = ANONYMOUS
        if self.policy.configured:
            names = self.identities(context)
            allowed = sorted(names & self.policy.identities)
            if not allowed:
                shown = ", ".join(sorted(names))
                raise PermissionDenied(f"{shown}: not allowed to write (write_identities)")
            identity = allowed[0]
        short = method.rsplit("/", 1)[-1]
        metrics.WRITES.labels(identity=identity, method=short).inc()
        log.info("%s accepted from %s (peer %s)", short, identity, context.peer())
