"""mTLS and write authorization against real servers on loopback (recsys.rpc.tls, recsys.rpc.auth).

Most servers run in this process (a thread each), which makes the fixtures quick; each TLS server
also has the plaintext health-only port the mtls overlay probes. One test starts `recsys serve`
as a child through the Launcher, whose health check must get through TLS too. Certificates come
from throwaway CAs made with the openssl CLI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from gateway.stages import GrpcRetrievalStage
from recsys.app.cli import main
from recsys.app.services import make_service
from recsys.core.domain import SearchQuery
from recsys.core.errors import InvalidInput, NotReady
from recsys.core.settings import Settings
from recsys.rpc import channels
from recsys.rpc.auth import WriteAuthorizer, bearer_token, parse_tokens
from recsys.rpc.launcher import FULL_NAMES, SERVING, Launcher, check_health, free_port
from recsys.rpc.server import Service, serve
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from tests.conftest import stack_settings

WRITER = "catalog-writer"
READER = "gateway"
TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


# -- certificates ------------------------------------------------------------------------------


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Pem:
    """A certificate and its key, as files."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


class CA:
    """A throwaway certificate authority that issues P-256 leaf certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", self.pem.key, "-out", self.pem.cert,
        )  # fmt: skip

    @property
    def cert(self) -> Path:
        return self.pem.cert

    def issue(self, name: str, common_name: str, sans: str) -> Pem:
        """A leaf for server and client use: `sans` as openssl writes them (DNS:x,IP:y)."""
        out = Pem(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        csr, ext = self.dir / f"{name}.csr", self.dir / f"{name}.ext"
        ext.write_text(
            f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"
            "basicConstraints=CA:FALSE\n"
        )
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={common_name}", "-keyout", out.key, "-out", csr,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr, "-CA", self.pem.cert, "-CAkey", self.pem.key,
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", out.cert,
        )  # fmt: skip
        return out


@dataclass(frozen=True)
class Pki:
    ca: CA
    other_ca: CA  # trusted by nobody
    server: Pem
    writer: Pem
    reader: Pem
    impostor: Pem  # CN catalog-writer, but from other_ca


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other = CA(root / "ca", "recsys-ca"), CA(root / "other", "other-ca")
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.issue("server", "retrieval", "DNS:localhost,IP:127.0.0.1"),
        writer=ca.issue("writer", WRITER, f"DNS:{WRITER}"),
        reader=ca.issue("reader", READER, f"DNS:{READER}"),
        impostor=other.issue("impostor", WRITER, f"DNS:{WRITER}"),
    )


def secure(address: str, creds: grpc.ChannelCredentials) -> grpc.Channel:
    """A channel with its own connections: gRPC would otherwise share one between channels, and
    a connection made before a certificate changed would hide the change."""
    return grpc.secure_channel(address, creds, options=[("grpc.use_local_subchannel_pool", 1)])


def credentials(trust: Path, pem: Pem | None = None) -> grpc.ChannelCredentials:
    """Client TLS credentials trusting `trust`, presenting `pem` (None: no certificate)."""
    if pem is None:
        return grpc.ssl_channel_credentials(root_certificates=trust.read_bytes())
    cert, key = pem.read()
    return grpc.ssl_channel_credentials(trust.read_bytes(), key, cert)


# -- servers in this process -------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    address: str
    health_address: str  # plaintext, health only


@contextmanager
def serving(service: Service, settings: Settings) -> Iterator[Running]:
    """`service` served by recsys.rpc.server.serve in a thread until the block ends."""
    port, health_port = free_port(), free_port()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failed: list[BaseException] = []

    def main() -> None:
        try:
            loop.run_until_complete(serve(service, settings, port, 0, stop, health_port))
        except BaseException as exc:
            failed.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=main, name=f"serve-{service.name}", daemon=True)
    thread.start()
    running = Running(f"127.0.0.1:{port}", f"127.0.0.1:{health_port}")
    give_up = time.monotonic() + 240
    while True:
        assert not failed, failed
        assert thread.is_alive() and time.monotonic() < give_up, f"{service.name} not SERVING"
        try:
            if check_health(running.health_address) == SERVING:
                break
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    try:
        yield running
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=60)


def retrieval_settings(bundle: Path, workdir: Path, **values: object) -> Settings:
    return stack_settings(bundle, workdir).model_copy(update=values)


@pytest.fixture(scope="module")
def mtls_retrieval(
    sample_bundle_root: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    """Retrieval requiring client certificates of pki.ca; only catalog-writer may write."""
    settings = retrieval_settings(
        sample_bundle_root,
        tmp_path_factory.mktemp("mtls"),
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_ca_file=pki.ca.cert,
        write_identities=f"{WRITER}, someone-else",
    )
    with serving(make_service("retrieval", settings), settings) as running:
        yield running


@pytest.fixture(scope="module")
def token_retrieval(
    sample_bundle_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    """Plaintext retrieval where writers authenticate with bearer tokens."""
    workdir = tmp_path_factory.mktemp("tokens")
    tokens = workdir / "tokens"
    tokens.write_text(f"# name:token\n{WRITER}:writer-secret\n{READER}: reader-secret\n")
    settings = retrieval_settings(
        sample_bundle_root, workdir, write_identities=WRITER, write_tokens_file=tokens
    )
    with serving(make_service("retrieval", settings), settings) as running:
        yield running


def item(item_id: str) -> retrieval_pb2.UpsertItemsRequest:
    return retrieval_pb2.UpsertItemsRequest(
        items=[common_pb2.Item(item_id=item_id, title="Security test lamp", category="home")]
    )


def known(stub: retrieval_pb2_grpc.RetrievalServiceStub, item_id: str) -> bool:
    reply = stub.GetItems(retrieval_pb2.GetItemsRequest(item_ids=[item_id]), timeout=TIMEOUT)
    return [r.item.item_id for r in reply.items] == [item_id]


def code_of(method: Callable[..., object], request: object, **options: object) -> grpc.StatusCode:
    """The status code `method(request)` ends with."""
    try:
        method(request, timeout=TIMEOUT, **options)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def writes(identity: str, method: str) -> float:
    labels = {"identity": identity, "method": method}
    return REGISTRY.get_sample_value("recsys_writes_total", labels) or 0.0


# -- mTLS --------------------------------------------------------------------------------------


def test_clients_without_a_trusted_certificate_fail_the_handshake(
    mtls_retrieval: Running, pki: Pki
) -> None:
    for who, pem in (("no certificate", None), ("another CA", pki.impostor)):
        with secure(mtls_retrieval.address, credentials(pki.ca.cert, pem)) as ch:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
            search = retrieval_pb2.SearchRequest(query_text="lamp", top_k=1)
            assert code_of(stub.Search, search) == grpc.StatusCode.UNAVAILABLE, who
            upsert = item("x-impostor")
            assert code_of(stub.UpsertItems, upsert) == grpc.StatusCode.UNAVAILABLE, who
    # Plaintext is not answered either.
    with grpc.insecure_channel(mtls_retrieval.address) as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        assert code_of(stub.UpsertItems, item("x-plain")) == grpc.StatusCode.UNAVAILABLE
    with secure(mtls_retrieval.address, credentials(pki.ca.cert, pki.writer)) as ch:
        assert not known(retrieval_pb2_grpc.RetrievalServiceStub(ch), "x-impostor")


def test_any_trusted_identity_reads_but_only_allowed_ones_write(
    mtls_retrieval: Running, pki: Pki
) -> None:
    with secure(mtls_retrieval.address, credentials(pki.ca.cert, pki.reader)) as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        hits = stub.Search(retrieval_pb2.SearchRequest(query_text="lamp", top_k=2), timeout=30)
        assert len(hits.hits) == 2
        # Health over the same (mTLS) port.
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == SERVING
        with pytest.raises(grpc.RpcError) as denied:
            stub.UpsertItems(item("x-reader"), timeout=TIMEOUT)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert READER in (denied.value.details() or "")
        delete = retrieval_pb2.DeleteItemsRequest(item_ids=[hits.hits[0].item_id])
        assert code_of(stub.DeleteItems, delete) == grpc.StatusCode.PERMISSION_DENIED
        assert not known(stub, "x-reader")
        assert known(stub, hits.hits[0].item_id)

    before = writes(WRITER, "UpsertItems")
    with secure(mtls_retrieval.address, credentials(pki.ca.cert, pki.writer)) as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        assert stub.UpsertItems(item("x-writer"), timeout=TIMEOUT).upserted == 1
        assert known(stub, "x-writer")
        stub.DeleteItems(retrieval_pb2.DeleteItemsRequest(item_ids=["x-writer"]), timeout=30)
        assert not known(stub, "x-writer")
    assert writes(WRITER, "UpsertItems") == before + 1
    assert writes(READER, "UpsertItems") == 0


def test_gateway_channel_presents_its_certificate_and_renews_it(
    mtls_retrieval: Running, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's channel to retrieval: mTLS from the settings' files, re-read on change."""
    monkeypatch.setattr(channels, "TLS_CHECK_S", 0.0)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.impostor.cert, cert)
    shutil.copy(pki.impostor.key, key)
    settings = Settings.built_in(
        retrieval_address=mtls_retrieval.address,
        tls_cert_file=cert,
        tls_key_file=key,
        tls_ca_file=pki.ca.cert,
    )
    query = SearchQuery(top_k=2, text="lamp")

    async def search_twice() -> int:
        stage = GrpcRetrievalStage(settings)
        try:
            with pytest.raises(NotReady):  # the handshake refuses the impostor's certificate
                await stage.search(query, timeout=TIMEOUT)
            for source, target in ((pki.reader.cert, cert), (pki.reader.key, key)):
                shutil.copy(source, target.with_suffix(".new"))
                os.replace(target.with_suffix(".new"), target)
            return len((await stage.search(query, timeout=TIMEOUT)).hits)
        finally:
            await stage.close()

    assert asyncio.run(search_twice()) == 2


def test_launcher_checks_health_through_tls(
    sample_bundle_root: Path, pki: Pki, tmp_path: Path
) -> None:
    """`recsys serve` with mTLS: the Launcher waits on the plaintext health-only port when one is
    set, else dials TLS with the settings' client certificate; plaintext on the TLS port fails."""
    settings = retrieval_settings(
        sample_bundle_root,
        tmp_path,
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_ca_file=pki.ca.cert,
        retrieval_health_port=free_port(),
    )
    launcher = Launcher(settings, log_dir=tmp_path / "logs", env={"OMP_NUM_THREADS": "1"})
    try:
        launcher.start("retrieval", wait=False)
        launcher.wait_serving("retrieval", timeout=240)  # on the health-only port
        over_tls = Launcher(settings.model_copy(update={"retrieval_health_port": 0}))
        assert over_tls.health("retrieval") == SERVING
        assert over_tls.health("retrieval", FULL_NAMES["retrieval"]) == SERVING
        with pytest.raises(grpc.RpcError) as plaintext:
            check_health(launcher.address("retrieval"))
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        launcher.close()


# -- bearer tokens, TLS off --------------------------------------------------------------------


def test_bearer_tokens_authorize_writes_without_tls(token_retrieval: Running) -> None:
    with grpc.insecure_channel(token_retrieval.address) as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)

        def upsert(item_id: str, token: str | None) -> grpc.StatusCode:
            metadata = [("authorization", f"Bearer {token}")] if token is not None else None
            return code_of(stub.UpsertItems, item(item_id), metadata=metadata)

        assert upsert("t-none", None) == grpc.StatusCode.UNAUTHENTICATED
        assert upsert("t-wrong", "writer-secreT") == grpc.StatusCode.UNAUTHENTICATED
        assert upsert("t-reader", "reader-secret") == grpc.StatusCode.PERMISSION_DENIED
        assert upsert("t-writer", "writer-secret") == grpc.StatusCode.OK
        # Reads need no token.
        assert [i for i in ("t-none", "t-wrong", "t-reader", "t-writer") if known(stub, i)] == [
            "t-writer"
        ]


# -- the CLI as a writer (recsys catalog upsert|delete) -----------------------------------------


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def catalog_file(directory: Path, *item_ids: str) -> Path:
    path = directory / "items.csv"
    rows = "".join(f"{i},Writer CLI lamp {i},home\n" for i in item_ids)
    path.write_text("item_id,title,category\n" + rows)
    return path


def test_the_cli_writes_with_a_token_file_and_is_refused_without_the_right_one(
    token_retrieval: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = catalog_file(tmp_path, "cli-a", "cli-b")
    writer, reader = tmp_path / "writer.token", tmp_path / "reader.token"
    writer.write_text("writer-secret\n")
    reader.write_text("reader-secret")
    upsert = ["catalog", "upsert", str(catalog), "--retrieval", token_retrieval.address]
    for extra, status in [
        ([], "UNAUTHENTICATED"),
        (["--token-file", str(reader)], "PERMISSION_DENIED"),
    ]:
        code, _, err = cli(upsert + extra, capsys)
        assert code == 2
        assert (
            err.startswith(f"recsys: error: retrieval failed with {status}: ")
            and err.count("\n") == 1
        )
    with grpc.insecure_channel(token_retrieval.address) as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        assert not known(stub, "cli-a")
        assert cli([*upsert, "--token-file", str(writer)], capsys)[:2] == (
            0,
            f"upserted 2 items from {catalog} into retrieval at {token_retrieval.address}\n",
        )
        assert known(stub, "cli-a") and known(stub, "cli-b")
        delete = ["catalog", "delete", "cli-a", "cli-never", "--retrieval", token_retrieval.address]
        assert cli([*delete, "--token-file", str(reader)], capsys)[0] == 2
        assert known(stub, "cli-a")
        code, out, _ = cli([*delete, "--token-file", str(writer)], capsys)
        assert (code, out) == (
            0,
            f"deleted 1 items from retrieval at {token_retrieval.address}; not there: cli-never\n",
        )
        assert not known(stub, "cli-a") and known(stub, "cli-b")


def test_the_cli_presents_its_client_certificate(
    mtls_retrieval: Running, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = catalog_file(tmp_path, "cli-mtls")
    upsert = ["catalog", "upsert", str(catalog), "--retrieval", mtls_retrieval.address]

    def tls(pem: Pem) -> list[str]:
        return [
            "--tls-cert",
            str(pem.cert),
            "--tls-key",
            str(pem.key),
            "--tls-ca",
            str(pki.ca.cert),
        ]

    code, _, err = cli(upsert + tls(pki.reader), capsys)
    assert code == 2 and "PERMISSION_DENIED" in err
    assert cli(upsert + tls(pki.writer), capsys)[0] == 0
    with secure(mtls_retrieval.address, credentials(pki.ca.cert, pki.reader)) as ch:
        assert known(retrieval_pb2_grpc.RetrievalServiceStub(ch), "cli-mtls")
    # A token file that is not one token is the caller's mistake, named before any call.
    bad = tmp_path / "bad.token"
    bad.write_text("two tokens")
    code, _, err = cli([*upsert, "--token-file", str(bad)], capsys)
    assert (code, err) == (
        2,
        f"recsys: error: --token-file {bad}: expected one token and nothing else\n",
    )


# -- certificate rotation on the server --------------------------------------------------------


class HealthOnly:
    """A Service with nothing but the health service every server has."""

    name = "probe"
    full_name = "test.Probe"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pass

    async def load(self) -> str:
        return "v1"

    async def close(self) -> None:
        pass


def secret_volume(directory: Path, pem: Pem, ca: Path) -> None:
    """Files laid out as kubelet mounts a Secret: links through `..data`, swapped atomically."""
    version = directory / f"..{time.monotonic_ns()}"
    version.mkdir()
    for source, name in ((pem.cert, "tls.crt"), (pem.key, "tls.key"), (ca, "ca.crt")):
        shutil.copy(source, version / name)
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", directory / "..data")


def test_server_certificate_reloads_when_the_files_change(pki: Pki, tmp_path: Path) -> None:
    new_ca = CA(tmp_path / "new-ca", "new-ca")
    volume = tmp_path / "tls"
    volume.mkdir()
    secret_volume(volume, pki.server, pki.ca.cert)
    settings = Settings.built_in(
        host="127.0.0.1",
        grace_period_s=0.5,
        tls_cert_file=volume / "tls.crt",
        tls_key_file=volume / "tls.key",
        tls_ca_file=volume / "ca.crt",
    )

    def check(trust: Path) -> grpc.StatusCode:
        with secure(running.address, credentials(trust, pki.reader)) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return code_of(stub.Check, health_pb2.HealthCheckRequest())

    with serving(HealthOnly(), settings) as running:
        assert check(pki.ca.cert) == grpc.StatusCode.OK
        assert check(new_ca.cert) == grpc.StatusCode.UNAVAILABLE
        # cert-manager renews: a certificate from another CA; clients still use pki.ca's.
        secret_volume(volume, new_ca.issue("renewed", "retrieval", "IP:127.0.0.1"), pki.ca.cert)
        assert check(new_ca.cert) == grpc.StatusCode.OK
        assert check(pki.ca.cert) == grpc.StatusCode.UNAVAILABLE


# -- pieces ------------------------------------------------------------------------------------


def test_token_file_format() -> None:
    path = Path("tokens")
    assert parse_tokens("# c\n\na: x:y \n b :z\n", path) == {"a": b"x:y", "b": b"z"}
    for bad in ("s3cret", ":s3cret", "a:", "a:s3cret\na:s3cret"):
        with pytest.raises(InvalidInput, match=r"tokens line \d") as info:
            parse_tokens(bad, path)
        assert "s3cret" not in str(info.value), "error messages never show a token"


def test_bearer_token_metadata() -> None:
    assert bearer_token([("authorization", "Bearer abc ")]) == b"abc"
    assert bearer_token([("x", "y"), ("authorization", "bearer abc")]) == b"abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_key_file"):
        Settings(tls_cert_file=tmp_path / "c")
    with pytest.raises(ValueError, match="tls_ca_file"):
        Settings(tls_cert_file=tmp_path / "c", tls_key_file=tmp_path / "k")
    plain_tls = Settings(
        tls_cert_file=tmp_path / "c", tls_key_file=tmp_path / "k", tls_client_auth=False
    )
    assert plain_tls.tls_enabled() and not Settings().tls_enabled()


def test_plaintext_and_open_writes_are_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="recsys.rpc.server")
    with serving(HealthOnly(), Settings.built_in(host="127.0.0.1", grace_period_s=0.5)):
        pass
    assert "PLAINTEXT" in caplog.text and "not authenticated" in caplog.text
    assert "UNAUTHENTICATED" in WriteAuthorizer(Settings.built_in()).describe()
    described = WriteAuthorizer(Settings.built_in(write_identities=" a, b ,")).describe()
    assert "writes allowed to a, b" in described
