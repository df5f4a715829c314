"""What a newcomer meets in the first minutes (issue 21): quiet libraries, fixes that name real commands, checks in
the right order, resume guidance, aspect ratio, full disks."""

from __future__ import annotations

import os
import shlex
import subprocess
from importlib.metadata import distribution

import pytest

from imagic_lite.models import download_command


def test_missing_model_fix_names_a_download_command_the_installed_hub_has():
    command = download_command("nobody/no-such-model")
    scripts = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    assert command.split()[0] in scripts | {"python"}
    if command.startswith("hf "):  # it parses: offline, the dry run gets as far as the hub, not a usage error
        result = subprocess.run([*shlex.split(command), "--dry-run"], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "No such option" not in result.stderr and "Usage:" not in result.stderr, result.stderr
        assert result.returncode != 0  # nothing to download offline


@pytest.mark.parametrize("chatter", [False, True])
def test_loading_prints_nothing_unless_asked(tiny_sd, capfd, caplog, chatter):
    """The library never prints: no "Loading weights" bars, "kept in float32" notices or bitsandbytes' kernel
    warning (issue 21, item 1); `chatter=True` (the CLI's --debug) shows them."""
    import logging

    from imagic_lite.api import Imagic
    from imagic_lite.models import library_chatter

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    Imagic.from_pretrained(str(tiny_sd), "cpu", chatter=chatter)
    with library_chatter(chatter):  # bitsandbytes warns at import on AVX512-BF16 CPUs; this CPU has none
        bnb.warning("Failed to load CPU gemm_4bit_forward (inside)")
    bnb.warning("Failed to load CPU gemm_4bit_forward (after)")
    printed = capfd.readouterr().err + caplog.text
    assert "(after)" in printed  # every setting restored afterwards
    if chatter:
        assert "(inside)" in printed and "Loading weights" in printed
    else:
        assert "(inside)" not in printed and "Loading weights" not in printed and "float32" not in printed
