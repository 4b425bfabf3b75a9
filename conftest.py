"""pytest setup shared by every test file: the offline tokenizer and the real test data.

The test data lives in the repository (samples/, see its README): a fresh clone tests itself.
tiktoken downloads the GPT-2 BPE files on first use; where there is no network (this project's
CI) a read-only copy sits in ../shared/tiktoken_cache, and we point tiktoken at it when it exists
and TIKTOKEN_CACHE_DIR is not already set.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SAMPLES = ROOT / "samples"
TIKTOKEN_CACHE = ROOT.parent / "shared" / "tiktoken_cache"

if "TIKTOKEN_CACHE_DIR" not in os.environ and TIKTOKEN_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)


@pytest.fixture(scope="session")
def samples() -> Path:
    """The repository's folder of real test data (FineWeb-Edu, HellaSwag, Tiny Shakespeare)."""
    return SAMPLES


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where there is none "
                                       "(run them alone with `python -m pytest -q -m gpu`)")
