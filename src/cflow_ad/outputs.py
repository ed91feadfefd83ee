"""Writing a run's files so that each is complete or visibly not, and a rerun leaves no stale ones.

Standard library only: the torch-free runtime (`predict` of an .onnx model) writes through it too.
A file is written under a temporary name and renamed (`replacing`); a command's output folder keeps
a manifest of the files it wrote, so the next run there removes exactly those (`OutputFolder`);
an output that cannot be written is a one-line error before any work (`check_writable`). File
names whose bytes are not UTF-8 are written as `\\xNN` in every text output (`as_text`).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import CflowInputError

# Python holds the bytes of a file name that are not UTF-8 as lone surrogates U+DC80..U+DCFF, which
# no UTF-8 text can hold: this codec error handler writes them as \xNN (any other lone surrogate as
# \uXXXX), so a CSV, a JSON file and the console show the same name and never fail on it.
NAMES = "cflow-ad-names"


def _escape_names(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    part = exc.object[exc.start:exc.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                   for c in part), exc.end


codecs.register_error(NAMES, _escape_names)


def as_text(value: str) -> str:
    """`value` as valid text: the undecodable bytes of a file name as \\xNN."""
    return value.encode("utf-8", NAMES).decode("utf-8")


def json_safe(value):
    """`value` with every non-finite float replaced by None and every string (keys too) made valid
    text, through dicts and lists: a metric that cannot be computed is null in JSON, never NaN (which
    strict parsers refuse), and a file name that is not UTF-8 cannot stop the file being written."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return as_text(value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value, indent: int | None = 2) -> str:
    """Strict JSON text of metrics or a summary (non-finite floats as null), newline-terminated."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n"


def temp_name(path: Path) -> Path:
    """Where `replacing` writes `path` first: hidden, so folder listings skip it."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def replacing(path: str | Path):
    """A temporary path beside `path` to write to, renamed over `path` when the block ends without an
    error and removed otherwise: readers see the old file or the whole new one, never part of one. The
    file gets the mode of any new file (0666 less the umask) whatever the writer does (safetensors
    leaves its files 0600)."""
    path = Path(path)
    tmp = temp_name(path)
    tmp.open("wb").close()
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """`text` written to `path` as UTF-8 through `replacing`."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=NAMES)
    return Path(path)


def check_writable(folder: str | Path, flag: str = "--output") -> Path:
    """Create `folder` and write a file in it, or a one-line error naming it: the check each command
    makes before any work, so a run never fails at its end for want of somewhere to write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CflowInputError(f"{flag} '{folder}' is a file, not a folder: pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CflowInputError(f"cannot write to {flag} '{folder}': {exc.strerror or exc}; pass a folder you can"
                              " write to") from None
    return folder


def check_writable_file(path: str | Path, flag: str = "--output") -> Path:
    """`check_writable` for a single output file: its folder, and that the path is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise CflowInputError(f"{flag} '{path}' is a folder: pass a file path")
    check_writable(path.parent, flag)
    return path


class OutputFolder:
    """The folder a command (`predict`, `test`) writes its files into. Writability is checked at once;
    `begin` removes the files that the command's last run there listed in the folder's manifest, and
    nothing else (a user's own files stay), so no output of an older run is mistaken for this one's.
    Each file is listed before it is written, so even a killed run's files go at the next run."""

    def __init__(self, folder: str | Path, command: str):
        self.path = check_writable(folder)
        self.manifest = self.path / f".cflow-ad-{command}-files"
        self.listed: set[str] = set()

    def begin(self) -> None:
        for name in self._previous():
            for p in (self.path / name, temp_name(self.path / name)):
                if not p.is_dir():
                    p.unlink(missing_ok=True)
        self.manifest.write_text("")
        self.listed.clear()

    def file(self, name: str) -> Path:
        """The path of output `name` (relative, may name a subfolder), listed in the manifest first."""
        path = self.path / name
        if name not in self.listed:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.manifest, "a", encoding="utf-8") as f:  # json.dumps keeps any name's bytes
                f.write(json.dumps(name) + "\n")
            self.listed.add(name)
        return path

    def write_text(self, name: str, text: str) -> Path:
        return write_text(self.file(name), text)

    def _previous(self) -> list[str]:
        """The names in the manifest that stay inside the folder; an unreadable line is ignored."""
        try:
            lines = self.manifest.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return []
        names = []
        for line in lines:
            try:
                name = json.loads(line)
            except ValueError:
                continue
            if isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts:
                names.append(name)
        return names


def percent(value: float | None, digits: int = 1, sign: str = "%") -> str:
    """A fraction as a percentage for people; 'n/a' where it could not be computed (None, or nan from older
    runs; e.g. pixel metrics without masks)."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{100 * value:.{digits}f}{sign}"
