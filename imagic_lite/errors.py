"""Errors a user can cause, each with a message written for them and a documented exit code.

The CLI prints `str(error)` as one line and exits with `error.exit_code`; nothing else in the
library decides how a failure looks.
"""

from __future__ import annotations


class ImagicError(Exception):
    """Base class: a failure with a one-line, user-facing message."""

    exit_code = 1


class InputError(ImagicError):
    """Bad image, prompt or option value."""

    exit_code = 2


class ConfigError(ImagicError):
    """Unknown preset, malformed preset/config TOML, invalid setting."""

    exit_code = 2


class ModelError(ImagicError):
    """A model that cannot be found, downloaded or understood."""

    exit_code = 3


class OutOfMemory(ImagicError):
    """The accelerator ran out of memory in a stage; the message names the next preset to try."""

    exit_code = 4


class TrainingDiverged(ImagicError):
    """A stage produced a non-finite loss (fp16 overflow and friends)."""

    exit_code = 5


class BundleError(ImagicError):
    """A bundle file that is missing, malformed, untrusted-looking or for another model."""

    exit_code = 6


class OutputError(ImagicError):
    """An output location that cannot be written, or would be overwritten without --overwrite."""

    exit_code = 7


class DiskFull(OutputError):
    """The disk (or quota) ran out while writing an output; the half-written temporary file was removed."""

    exit_code = 7

    HINT = "free space there or choose another --out"

    def __init__(self, message: str, folder: object = None) -> None:
        super().__init__(f"{message}; {self.HINT}")
        self.message, self.folder = message, folder


class BatchFailed(ImagicError):
    """`batch` ran every job it could, and some failed (summary.jsonl says which and why)."""

    exit_code = 8


class Interrupted(ImagicError):
    """Ctrl-C or SIGTERM; a resumable checkpoint may have been written."""

    exit_code = 130

    state: object = None  # a StageState to save as a resumable checkpoint, when a training stage was stopped

    @classmethod
    def with_state(cls, state: object) -> Interrupted:
        error = cls(f"stopped in stage {getattr(state, 'stage', '?')} at step {getattr(state, 'step', '?')}")
        error.state = state
        return error


EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (rerun with --debug for a traceback)",
    2: "bad input, option or config",
    3: "model not found or not loadable",
    4: "out of memory",
    5: "training diverged (non-finite loss)",
    6: "bad or mismatched bundle",
    7: "output not writable or already exists",
    8: "batch: some jobs failed (the last line counts them; DIR/summary.jsonl says why)",
    130: "interrupted (Ctrl-C / SIGTERM)",
}
