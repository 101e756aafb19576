"""The exceptions and the warning sharedexec raises.

Every exception derives from :class:`SharedExecError` *and* from the builtin it
specialises, so ``except OSError`` / ``except ValueError`` written for the
stdlib keeps working and ``except sharedexec.SharedExecError`` catches them all.
"""

from __future__ import annotations


class SharedExecError(Exception):
    """Base class of every error raised by sharedexec."""


class SharedMemoryError(SharedExecError, OSError):
    """A shared-memory segment could not be created, attached or read."""


class SharedMemoryFullError(SharedMemoryError):
    """The shared-memory directory has no room for a new segment."""


class SegmentNotFoundError(SharedMemoryError, FileNotFoundError):
    """A handle names a segment that no longer exists."""


class SegmentNotOursError(SegmentNotFoundError):
    """A file at a segment's name is not a segment of this user: a symlink, a
    FIFO, another user's file, a file with a mode other than 0600. It is never
    read: the segment looked for is gone, and something else took its name."""


class SegmentCorruptError(SharedMemoryError):
    """A segment's header or layout does not describe a valid sharedexec segment."""


class NotShareableError(SharedExecError, TypeError):
    """An object of a type sharedexec cannot share was given to ``share()``."""


class SharedReadOnlyError(SharedExecError, ValueError):
    """A task tried to write in place into data shared read-only."""


class SharedExecWarning(UserWarning):
    """Something was not shared as asked; the message says what to change."""
