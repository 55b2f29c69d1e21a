"""What the commands share at their edge: argument checks, reading and writing lines, and one-line errors.

Bad input ends a command with one line ``error: <problem>; <fix>`` on stderr and a non-zero exit, never
a traceback: argparse's usage errors through :class:`ArgumentParser`, everything else through
:func:`one_line_errors`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..callbacks.writers import write_atomically


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error:`` line (exit status 2) instead of the usage block first."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors bad input raises (files, values, a missing extra) into ``SystemExit("error: ...")``.

    Python prints a ``SystemExit`` message as is, with exit status 1. Other exceptions are bugs and keep
    their traceback.
    """
    try:
        yield
    except (OSError, ValueError, ImportError) as error:
        message = " ".join(str(error).split("\n")) or type(error).__name__
        raise SystemExit(f"error: {message}") from None


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Print warnings (e.g. over-long input) as one ``warning:`` line, not with the source excerpt Python adds."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        yield


# ----- argparse types: a bad value is refused before anything is loaded -----------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer; pass 1 or more")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; pass 0 or more")
    return value


def temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"temperature={value} is negative; pass 0 (greedy) or more, e.g. 1.0")
    return value


def top_k(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"top_k={value} keeps no token; pass 1 or more, or leave it out for all")
    return value


def top_p(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"top_p={value} is outside (0, 1]; pass e.g. 0.9, or leave it out for all")
    return value


def device(text: str) -> str:
    kind, colon, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; pass cpu, cuda or cuda:N")
    return text


def check_cuda(device_name: str, count: int) -> None:
    """Refuse a CUDA ``device_name`` beyond the ``count`` CUDA devices this machine has."""
    kind, _, index = device_name.partition(":")
    if kind == "cuda" and int(index or 0) >= count:
        raise ValueError(f"--device {device_name} asks for a CUDA device but {count} are available here; "
                         "use --device cpu.")


# ----- files ----------------------------------------------------------------------------------------
def check_input(path: str, what: str = "sentence") -> None:
    """Refuse an input that is neither ``-`` (stdin) nor a file."""
    if path == "-" or Path(path).is_file():
        return
    problem = "is a folder" if Path(path).is_dir() else "does not exist"
    raise FileNotFoundError(f"input file {path} {problem}; pass a text file, one {what} a line, or '-'.")


def read_lines(path: str, what: str = "sentence") -> list[str]:
    """The lines of ``path`` (``-``: stdin) without their line ends; a file must be UTF-8."""
    check_input(path, what)
    try:
        if path == "-":
            return [line.rstrip("\n") for line in sys.stdin]
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle]
    except UnicodeDecodeError as error:
        name = "stdin" if path == "-" else path
        raise ValueError(f"{name} is not UTF-8 text (byte {error.start}: {error.reason}); convert it, e.g. with "
                         "`iconv -t utf-8`.") from None


def check_new_file(path: str | Path) -> Path:
    """``path`` as a ``Path``, refused if it exists or its folder does not: commands never overwrite."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose another --output, this command never overwrites a file.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of --output {path} does not exist; create it or write elsewhere.")
    return path


def check_output(path: str) -> Path | None:
    """``None`` for ``-`` (stdout), else :func:`check_new_file`."""
    return None if path == "-" else check_new_file(path)


def write_lines(output: Path | None, lines: Sequence[str]) -> None:
    """Each line with a line end, to stdout (``None``) or atomically to a new file."""
    text = "".join(line + "\n" for line in lines)
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomically(output, text)
