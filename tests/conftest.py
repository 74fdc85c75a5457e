"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> pathlib.Path:
    """Path to a file in ../shared/data, or skip the test (with the reason) where it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared/data is absent on this machine)")
    return path


@pytest.fixture
def llama_tokenizer_path() -> pathlib.Path:
    return shared_file("llama2-tokenizer.model")
