"""What a newcomer meets in the first minutes (issue 21): quiet libraries, fixes that name real commands, checks in
the right order, resume guidance, aspect ratio, full disks."""

from __future__ import annotations

import os
import shlex
import subprocess
from importlib.metadata import distribution

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
