"""Session fixtures: small real artifacts built once (the sample bundle) and the MovieLens zip."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, settings

from recsys.core.encoder import TextEncoder, default_encoder_dir
from recsys.core.settings import Settings
from recsys.rpc.launcher import SERVICES, Launcher, on_free_ports
from tests.postgres import PostgresServer, binaries

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property-based suites: few derandomized examples in CI; `pytest --hypothesis-profile=full`
# for a long run. Calls go to real servers: no per-example deadline.
_REAL_SERVERS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("ci", max_examples=25, derandomize=True, **_REAL_SERVERS)
settings.register_profile("full", max_examples=400, **_REAL_SERVERS)
settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/chaos/conftest.py: pytest reads options only from conftests it loads
    # at start-up, and a plain `pytest --chaos-full` loads this one.
    parser.addoption(
        "--chaos-full",
        action="store_true",
        help="run tests/chaos at full size (more kills, writers and requests: minutes)",
    )


REPO_ROOT = Path(__file__).resolve().parent.parent
MOVIELENS_ZIP = Path(
    os.environ.get(
        "RECSYS_MOVIELENS_ZIP", REPO_ROOT.parent / "shared" / "data" / "ml-latest-small.zip"
    )
)


SCIFACT_DIR = Path(
    os.environ.get("RECSYS_SCIFACT_DIR", REPO_ROOT.parent / "shared" / "data" / "scifact")
)


TITLES = [
    ("Trail running shoes", "Shoes", "Lightweight shoes with a grippy sole for muddy trails."),
    ("Leather office shoes", "Shoes", "Black oxford shoes, hand-stitched."),
    ("Wool hiking socks", "Clothing", "Warm merino socks."),
    ("Rain jacket", "Clothing", "Waterproof breathable shell with a hood for hikes in the rain."),
    ("Espresso machine", "Kitchen", "15-bar pump, steam wand for milk."),
    ("Chef's knife", "Kitchen", "20 cm stainless steel blade."),
    ("Cast iron skillet", "Kitchen", ""),
    ("Noise-cancelling headphones", "Electronics", "Over-ear, 30 hours of battery."),
    ("USB-C charger", "Electronics", "65 W, charges a laptop and a phone at once."),
    ("Mechanical keyboard", "Electronics", "Tactile switches, backlit keys, aluminium frame."),
    ("Yoga mat", "Sports", "Non-slip, 6 mm thick."),
    ("Road bike helmet", "Sports", "Ventilated helmet for cycling on the road, with MIPS."),
    ("Tennis racket", "Sports", ""),
    ("Children's picture book", "Books", "A bedtime story about a sleepy bear."),
    ("Science fiction novel", "Books", "A crew wakes up on a generation ship far from Earth."),
    (
        "Cookbook: Italian classics",
        "Books",
        "Pasta, risotto and sauces from every region of Italy.",
    ),
    ("Garden hose", "Garden", "25 m, kink-free."),
    ("Pruning shears", "Garden", "Bypass blades for branches up to 2 cm."),
    ("Desk lamp", "Home", "LED lamp with adjustable colour temperature and a USB port."),
    ("Scented candle", "Home", "Vanilla, 40 hours."),
    ("Board game", "Toys", "Strategy game for two to four players, about an hour a game."),
    ("Building blocks", "Toys", "500 pieces."),
    ("Dog leash", "Pets", "Reflective nylon leash, 2 m."),
    ("Cat scratching post", "Pets", "Sisal rope post with a platform on top."),
]


@pytest.fixture(scope="session")
def catalog() -> pd.DataFrame:
    """A small catalog in the build's input shape."""
    return pd.DataFrame(
        {
            "item_id": [f"item-{i:03d}" for i in range(len(TITLES))],
            "title": [t for t, _, _ in TITLES],
            "category": [c for _, c, _ in TITLES],
            "description": [d for _, _, d in TITLES],
            "attributes": [{} for _ in TITLES],
        }
    )


@pytest.fixture(scope="session")
def texts(catalog: pd.DataFrame) -> list[str]:
    """Item texts of the small catalog, of clearly different token lengths."""
    from retrieval_service.build import catalog_texts

    return catalog_texts(catalog)


@pytest.fixture(scope="session")
def item_vectors(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode(texts)


@pytest.fixture(scope="session")
def encoder() -> TextEncoder:
    """all-MiniLM-L6-v2 with mean pooling on CPU, loaded once per test session."""
    return TextEncoder.load(default_encoder_dir(), pooling="mean", device="cpu")


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    if not (SCIFACT_DIR / "corpus.jsonl").is_file():
        pytest.skip(f"{SCIFACT_DIR} not found (set RECSYS_SCIFACT_DIR to the SciFact folder)")
    return SCIFACT_DIR


@pytest.fixture(scope="session")
def movielens_zip() -> Path:
    if not MOVIELENS_ZIP.is_file():
        pytest.skip(f"{MOVIELENS_ZIP} not found (set RECSYS_MOVIELENS_ZIP to the MovieLens zip)")
    return MOVIELENS_ZIP


AMAZON_SCIENTIFIC_DIR = Path(
    os.environ.get(
        "RECSYS_AMAZON_SCIENTIFIC_DIR", REPO_ROOT.parent / "shared" / "data" / "amazon-scientific"
    )
)


@pytest.fixture(scope="session")
def amazon_scientific_dir() -> Path:
    if not (AMAZON_SCIENTIFIC_DIR / "Scientific.text").is_file():
        pytest.skip(
            f"{AMAZON_SCIENTIFIC_DIR} not found (set RECSYS_AMAZON_SCIENTIFIC_DIR to the folder "
            "of UniSRec's Scientific files)"
        )
    return AMAZON_SCIENTIFIC_DIR


@pytest.fixture(scope="session")
def sample_bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample catalog built into a real bundle (encoder, Flat index, ALS, fine-tuned CE)."""
    from ranking_service.distill import DistillConfig
    from ranking_service.train import RankerTrainConfig
    from recsys.app.build import BuildOptions, build_bundle
    from recsys.app.sample import sample_paths

    catalog, interactions = sample_paths()
    root = tmp_path_factory.mktemp("bundle") / "sample"
    build_bundle(
        BuildOptions(
            catalog=catalog,
            interactions=interactions,
            out=root,
            # fp32 everywhere: a CPU with native bf16 would otherwise fine-tune another model.
            ranker=RankerTrainConfig(
                steps=8, batch_size=8, max_length=64, validation_users=24, bf16=False
            ),
            student=DistillConfig(steps=20, batch_size=16),
            fusion_lists=40,
            # No depth is over this budget at any machine's speed: the sweep and the depths it
            # chooses are then the same everywhere, as the golden figures need.
            rerank_budget_ms=1e6,
            device="cpu",
            cf_search=True,  # off by default; built here so the search's path is tested
            always_copies=True,  # the copies' path, whether or not the cross-encoder pays here
        )
    )
    return root


def stack_settings(bundle: Path, workdir: Path) -> Settings:
    """Settings for a test stack: loopback, free ports, CPU, its own journal, a short drain."""
    return on_free_ports(
        Settings.built_in(
            bundle=bundle, state_dir=workdir / "state", device="cpu", grace_period_s=1
        )
    )


@pytest.fixture(scope="module")
def stack(sample_bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """All three services running over the sample bundle, with a fresh retrieval journal."""
    workdir = tmp_path_factory.mktemp("stack")
    launcher = Launcher(
        stack_settings(sample_bundle_root, workdir),
        log_dir=workdir,
        env={"OMP_NUM_THREADS": "1"},
    )
    try:
        launcher.start_all(timeout=240)
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def own_stack(sample_bundle_root: Path, tmp_path: Path) -> Iterator[Callable[..., Launcher]]:
    """Stacks private to one test, for tests that stop, restart or reconfigure services.

    `own_stack(*names, wait=True, **settings)` starts the named services (all three when none
    is named) over the sample bundle with those Settings fields changed, in parallel, and
    waits until each is SERVING (`wait=False`: only starts them). Each call is a separate
    stack with its own ports and journal; everything is stopped after the test, so a failure
    cannot leave a stopped or changed service to the next test.
    """
    launchers: list[Launcher] = []

    def start(*names: str, wait: bool = True, **settings: Any) -> Launcher:
        workdir = tmp_path / f"stack-{len(launchers)}"
        launcher = Launcher(
            stack_settings(sample_bundle_root, workdir).model_copy(update=settings),
            log_dir=workdir,
            env={"OMP_NUM_THREADS": "1"},
        )
        launchers.append(launcher)
        for name in names or SERVICES:
            launcher.start(name, wait=False)
        if wait:
            for name in names or SERVICES:
                launcher.wait_serving(name, timeout=240)
        return launcher

    try:
        yield start
    finally:
        for launcher in launchers:
            launcher.close()


def _postgres_server() -> PostgresServer:
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL not found (.ci/run installs Debian's postgresql package)")
    server = PostgresServer(bin_dir)
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server shared by the session; tests take a database each."""
    server = _postgres_server()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def change_log_url(postgres: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL, for one test's change log."""
    return postgres.create_database(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server private to one test, which may kill and restart it."""
    server = _postgres_server()
    try:
        yield server
    finally:
        server.remove()
