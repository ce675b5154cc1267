"""How a prepare run stops (PrepareError: one line for the user), and what it does with a damaged input file
(data.on_input_error): under stop, InputFileError naming the file and how far its read got; under quarantine, the
file is left out and listed. read.py's docstring says what counts as damage; the driver learns of it mid-stream by a
Damaged from the stream's consumer (consume.py)."""

from __future__ import annotations


class PrepareError(RuntimeError):
    """A prepare run that must stop (bad record under --strict, empty output): one line for the user."""


class InputFileError(PrepareError):
    """A damaged or unreadable input file under data.on_input_error: stop (read.py's docstring says which)."""


class Damaged(Exception):
    """Raised on the driver when the stream brings a damaged file's INPUT_ERROR row."""

    def __init__(self, file_idx: int, damage: dict):
        super().__init__(damage["reason"])
        self.file_idx, self.damage = file_idx, damage


def how_far(damage: dict) -> str:
    """How far the read of a damaged file got, in words: lines and bytes."""
    read, size = damage.get("bytes_read"), damage.get("bytes")
    if read is None:
        of = f"{size:,}-byte file" if size is not None else "file"
        return f"{damage['lines_read']:,} lines read of the {of}"
    of = f" of {size:,}" if size is not None else ""
    return f"{damage['lines_read']:,} lines read, {read:,}{of} bytes"


def input_error_message(path: str, damage: dict) -> str:
    """The one line a damaged input stops the run with: the file, what is wrong, how far the read got, the fix."""
    return (
        f"input file {path}: {damage['reason']} ({how_far(damage)}); nothing was written. Restore or re-create the "
        "file (or drop it from data.inputs), or set data.on_input_error=quarantine to prepare without it"
    )


def quarantine(damaged: dict[str, dict], quarantined: dict[str, dict]) -> None:
    """Add the damaged files to `quarantined` ({path: damage}), each with one line on stdout."""
    for path, dmg in damaged.items():
        quarantined[path] = dmg
        print(f"quarantined: {path}: {dmg['reason']} ({how_far(dmg)})", flush=True)
