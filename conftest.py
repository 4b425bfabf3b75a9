"""pytest setup shared by every test file: the offline tokenizer and the real test data.

tiktoken downloads the GPT-2 BPE files on first use; here there is no network, so when
../shared/tiktoken_cache exists (the project's test data, read-only) we point tiktoken at it.
"""
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent / "shared"
DATA = SHARED / "data"

if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real test data (FineWeb-Edu rows, HellaSwag rows, Tiny Shakespeare)."""
    assert DATA.is_dir(), f"test data missing: {DATA}"
    return DATA
