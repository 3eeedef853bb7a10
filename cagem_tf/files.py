"""The ground floor: the one user-error base class, atomic writes, JSON and the run directory's
lock. Imports nothing of the package.

A file is written whole or not at all: `write_file` writes a temporary file beside it and
renames it into place, so a reader (or a process killed mid-write) never sees half a file, and a
write that fails (a full disk, a read-only folder) leaves what was there before.
"""

import errno
import fcntl
import json
import os
import socket
import time


class UserError(Exception):
    """Bad input or a state the user must change: the message is one line that says what to do.
    Every error of the package meant for its user derives from it; every program prints its
    message and exits with status 1 (`cagem_tf.cli`)."""


class FileError(UserError, ValueError):
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


class InUseError(UserError):
    """A run directory another process is writing into."""


class Lock:
    """The run directory's lock, held by the one process that writes into it (training, an
    evaluation or an export); read-only use needs none.

    An exclusive flock on RUN/.lock, which also names the holder (PID, host, since when). The
    kernel drops the flock when its process dies however it dies, so a lock left by a killed
    process is simply taken over. Use as a context manager.
    """

    FILE = ".lock"

    def __init__(self, model_dir: str, purpose: str):
        self.path = os.path.join(model_dir, self.FILE)
        self.purpose = purpose
        self.fd = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise InUseError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for it "
                           "to finish or stop it (a killed process leaves no lock behind)") \
                from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        try:
            os.write(fd, f"PID {os.getpid()} on {socket.gethostname()} ({self.purpose}) "
                         f"since {stamp}\n".encode())
        except OSError:  # a full disk: the flock holds all the same, unnamed
            pass
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
