"""The one logging setup of a `recsys` process: our lines at the chosen level, libraries quiet.

Imports nothing heavy: `recsys bundle info` must start fast and never load torch.
"""

from __future__ import annotations

import logging
import os
import sys

from recsys.core.errors import InvalidInput

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries we call. Below ERROR their lines are about their own internals (which CPU build
# FAISS loaded, the fresh classification head we add on purpose), not about the user's run.
LIBRARY_LOGGERS = (
    "accelerate",
    "bm25s",
    "datasets",
    "faiss",
    "filelock",
    "fsspec",
    "httpx",
    "huggingface_hub",
    "implicit",
    "matplotlib",
    "numba",
    "PIL",
    "sentence_transformers",
    "torch",
    "transformers",
    "urllib3",
)
# These libraries set their own logger's level when first imported, overriding ours: only
# their variables reach a logger that does not exist yet.
VERBOSITY_VARIABLES = ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY")
# Read when transformers, datasets and the hub are imported (transformers' "Loading weights"
# and "Writing model shards" bars follow the hub's switch).
PROGRESS_VARIABLES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


class ProgressAwareHandler(logging.Handler):
    """Writes to the current sys.stderr through tqdm, so a log line never breaks a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm  # imported on the first line only: bundle info logs none

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class LibraryFilter(logging.Filter):
    """Drops library records below `level`: some libraries (bm25s) reset their own logger's
    level when imported, after ours was set."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".", 1)[0] not in LIBRARY_LOGGERS or record.levelno >= self.level


def parse_level(level: str) -> int:
    """The logging level named `level` (any case); anything else is an input error."""
    name = level.strip().upper()
    if name not in LEVELS:
        raise InvalidInput(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    return int(logging.getLevelName(name))


def configure_logging(level: str) -> None:
    """Our loggers at `level`; libraries' at ERROR and without progress bars unless DEBUG.

    Safe to call again (tests do): it replaces its own handler and leaves others alone.
    """
    value = parse_level(level)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ProgressAwareHandler)]:
        root.removeHandler(handler)
    verbose = value <= logging.DEBUG
    handler = ProgressAwareHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(LibraryFilter(logging.DEBUG if verbose else logging.ERROR))
    root.addHandler(handler)
    root.setLevel(value)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    for variable in VERBOSITY_VARIABLES:
        os.environ[variable] = "debug" if verbose else "error"
    if not verbose:
        quiet_library_progress()


def quiet_library_progress() -> None:
    """Turns off the Hugging Face libraries' progress bars (`--log-level DEBUG` keeps them)."""
    for variable in PROGRESS_VARIABLES:
        os.environ[variable] = "1"
    # Already imported (a test process): the variables came too late, so use their switches.
    # Looked up in sys.modules so this never imports them.
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_progress_bar()
    datasets_tqdm = sys.modules.get("datasets.utils.tqdm")
    if datasets_tqdm is not None:
        datasets_tqdm.disable_progress_bars()
