"""User-facing errors of mezo-replay.

Every error a user can cause or fix (a damaged file, a file from a newer version, an existing output)
derives from MezoReplayError, so the command line can print its one-line message instead of a
traceback. Programming errors (bad arguments to the Python API) stay ValueError/TypeError.
"""

from __future__ import annotations


class MezoReplayError(Exception):
    """Base of every error whose message is meant for the user."""


class TrajectoryError(MezoReplayError):
    """A `.mzt` file breaks a rule of spec/format.md."""


class UnsupportedError(TrajectoryError):
    """The file is valid but uses something this version does not know (a newer writer made it)."""


class LimitError(TrajectoryError):
    """A size or count in the file (or header) exceeds a limit of spec/format.md."""


class CorruptChunkError(TrajectoryError):
    """A chunk failed its CRC, zstd or structure checks; nothing from it onwards is used."""

    def __init__(self, path: object, index: int, type: str, offset: int, reason: str,
                 steps_before: int | None = None) -> None:
        self.path, self.index, self.type, self.offset, self.reason = path, index, type, offset, reason
        intact = "" if steps_before is None else f"; the {steps_before} steps before it are intact"
        super().__init__(f"{path}: chunk {index} ({type}) at byte offset {offset} is corrupt: {reason}{intact}")


class OutputExistsError(MezoReplayError, FileExistsError):
    """Refusing to replace an existing output file without an explicit request."""


class CheckpointError(MezoReplayError):
    """A base checkpoint is malformed or unsupported, or an output write violates its layout."""
