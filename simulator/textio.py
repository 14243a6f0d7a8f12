"""Reading user files: one place that turns every way a file can be unreadable into a one-line
error naming the file (missing, unreadable, not UTF-8, malformed or absurdly nested YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_text(path: Path, error: type[Exception]) -> str:
    """The file's text; ``error(message)`` when it is missing, unreadable or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None


def parse_yaml(text: str, path: Path | str, error: type[Exception]) -> Any:
    """Parsed YAML; ``error(message)`` with line and column when it is malformed."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise error(f"{path}: malformed YAML: nested too deeply") from None
