"""Files on the ground floor: atomic writes, JSON, and the one-line error for a file that cannot
be read or written. Imports nothing of the package.

A file is written whole or not at all: `write_file` writes a temporary file beside it and
renames it into place, so a reader (or a process killed mid-write) never sees half a file, and a
write that fails (a full disk, a read-only folder) leaves what was there before.
"""

import json
import os


class FileError(ValueError):
    """A file that cannot be written or read as asked; the message is one line naming it."""


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_file(path: str, write, mode: str = "w") -> None:
    """write(f) into a temporary file, renamed into place: never half-written. A write that
    fails leaves the old file as it was and raises FileError naming the file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        # newline="": lines are written as given (what the csv module needs).
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise FileError(f"could not write {path} ({reason}); what was there before is "
                        "unchanged: free space or fix the permissions and rerun") from None


def write_json(path: str, value) -> None:
    """`write_file` of the JSON text of `value`."""
    write_file(path, lambda f: (json.dump(value, f, indent=2, sort_keys=True), f.write("\n")))


def read_json(path: str):
    """The JSON value in `path`; a damaged file (not JSON, or not UTF-8) is a FileError that
    names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                        "restore it from a copy, or start a new run with --fresh") from None
