"""Peak memory measured: one stage's CUDA allocator peak (or CPU peak RSS, which is not VRAM), free memory for
`--vram auto`, and measured peaks read back from bench results. Predicted peaks come from imagic_lite.simulate.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GiB = 2**30

# ---------------------------------------------------------------------------------------------------------------
# Measuring one stage


@dataclass(frozen=True)
class Peak:
    """One stage's peak. `label` says what was measured: CUDA allocator bytes, or the CPU process's peak RSS."""

    label: str  # "cuda_max_allocated" | "cpu_peak_rss" (VmHWM) | "cpu_rss_sampled" (psutil thread)
    peak_bytes: int  # CUDA max_memory_allocated, or CPU peak resident set size of the whole process
    start_bytes: int  # allocated / RSS when the stage began (weights already resident)
    reserved_bytes: int | None = None  # CUDA max_memory_reserved (what the card really had to give)


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_hwm() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _trim_heap() -> None:
    """Give freed heap pages back to the OS so a stage's RSS does not start with the previous stage's garbage."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _RssSampler:
    """Fallback where VmHWM cannot be reset: sample RSS every 2 ms in a thread (misses shorter spikes)."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss())


class PeakMemory:
    """Context manager measuring one stage's peak on `device`; the result is in `.peak` after the block, also when
    the block raised (an OOM is a measurement too)."""

    def __init__(self, device: torch.device | str) -> None:
        import torch

        self.device = torch.device(device)
        self.peak: Peak | None = None
        self._start = 0
        self._sampler: _RssSampler | None = None

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._start = _rss()
            if not _reset_hwm():
                self._sampler = _RssSampler()
        return self

    def __exit__(self, *exc) -> bool:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = Peak("cuda_max_allocated", torch.cuda.max_memory_allocated(self.device), self._start,
                             torch.cuda.max_memory_reserved(self.device))
        elif self._sampler is not None:
            self.peak = Peak("cpu_rss_sampled", self._sampler.stop(), self._start)
        else:
            self.peak = Peak("cpu_peak_rss", _status_kib("VmHWM") or _rss(), self._start)
        return False


# ---------------------------------------------------------------------------------------------------------------
# Free memory for `--vram auto` (the choice itself comes from simulated peaks: imagic_lite.simulate)


def auto_vram() -> float | None:
    """Free CUDA memory in GiB, or None without CUDA (the CLI then uses the `cpu` preset)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / GiB


# ---------------------------------------------------------------------------------------------------------------
# Reading measurements back


def measured_peaks(results_dir: str | Path, model: str = "arch:sd15", device_type: str = "cuda") -> dict[str, dict]:
    """Measured peak bytes per preset and stage from bench JSON files (the newest uncapped run wins); {} if none.
    Only `device_type` runs count: CPU peak RSS is not VRAM."""
    peaks: dict[str, dict] = {}
    for path in sorted(Path(results_dir).glob("bench-*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("model") != model or result.get("cap_gb") or result.get("env", {}).get("device") != device_type:
            continue
        for name, entry in result.get("presets", {}).items():
            stages = {s: r["peak_bytes"] for s, r in entry.get("stages", {}).items() if r.get("fit")}
            if stages:
                peaks[name] = stages
    return peaks
