"""Shared fixtures: offline Hugging Face settings, tiny pipelines saved once per session, test images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Hub settings are read when huggingface_hub is imported: set them before anything imports diffusers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "imagic-lite-test-hf-home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and two threads per process on a shared 2-core machine
# oversubscribe badly (a tiny UNet forward went from 0.03 s to 3.6 s under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny pipelines by kind: `sd` (epsilon), `sd-v` (v-prediction), `sdxl`."""
    from tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_pipeline(root / kind, kind) for kind in ("sd", "sd-v", "sdxl")}


@pytest.fixture(scope="session")
def tiny_models_16(tmp_path_factory) -> dict[str, Path]:
    """The same three pipelines at a 16 px native size, for the runs under tests/cuda_rules.py: half-precision
    convolutions on a CPU without native bf16/fp16 run 5-20x slower than fp32, so every pixel counts."""
    from tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-models-16")
    return {kind: build_tiny_pipeline(root / kind, kind, sample_size=8) for kind in ("sd", "sd-v", "sdxl")}


@pytest.fixture(scope="session")
def tiny_sd(tiny_models) -> Path:
    return tiny_models["sd"]


@pytest.fixture
def photo(tmp_path) -> Path:
    """A small RGB test photo: a red disc on grey, non-square so aspect handling is exercised."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 72), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((24, 12, 72, 60), fill=(220, 30, 30))
    path = tmp_path / "photo.png"
    image.save(path)
    return path


def _library_logging() -> tuple:
    import logging

    import diffusers
    import transformers

    return (logging.getLogger("bitsandbytes").level, diffusers.utils.logging.get_verbosity(),
            transformers.utils.logging.get_verbosity(), diffusers.utils.logging.is_progress_bar_enabled(),
            transformers.utils.logging.is_progress_bar_enabled())


def _set_library_logging(saved: tuple) -> None:
    import logging

    import diffusers
    import transformers

    logging.getLogger("bitsandbytes").setLevel(saved[0])
    diffusers.utils.logging.set_verbosity(saved[1])
    transformers.utils.logging.set_verbosity(saved[2])
    for module, enabled in ((diffusers, saved[3]), (transformers, saved[4])):
        (module.utils.logging.enable_progress_bar if enabled else module.utils.logging.disable_progress_bar)()


@pytest.fixture(scope="session")
def _library_logging_baseline() -> tuple:
    return _library_logging()


@pytest.fixture(autouse=True)
def _library_logging_restored(_library_logging_baseline):
    """The CLI quiets library loggers for its whole process (cli._quiet_libraries); tests call it in-process, and
    module-scoped fixtures run it before a test's own fixtures: so each test starts and ends with the loggers as the
    session found them, whatever ran earlier."""
    _set_library_logging(_library_logging_baseline)
    yield
    _set_library_logging(_library_logging_baseline)
