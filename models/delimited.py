"""Checked readers for delimited text files: fast when the file is clean, every bad line reported by number.

The format loaders (`slimrec.models.grouplens`, `slimrec.models.recbole`) read through
these, so a malformed MovieLens file fails with its path, line and problem
(`DataFormatError`), not with a pandas traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from slimrec.models.data import DataFormatError

_CHUNK_ROWS = 1_000_000


def read_delimited(
    path: Path,
    sep: str,
    names: list[str],
    numeric: dict[str, str],
    header_lines: int = 0,
    encoding: str | None = None,
) -> pd.DataFrame:
    """Read a delimited file with exactly `len(names)` fields per line, as strings,
    then convert the `numeric` columns ({name: dtype}); any bad line is reported by number.

    `sep="::"` (MovieLens 1M/10M) is read as ":" with the empty fields between the colon
    pairs dropped: pandas' C parser takes one-character separators only, and the python
    engine is far too slow for 10M rows.
    """
    check_file(path)
    encoding = encoding or sniff_encoding(path)
    _check_first_line(path, sep, len(names), header_lines, encoding)
    columns = [c for name in names for c in (name, f"\x00gap-{name}")][:-1] if sep == "::" else names
    read = dict(
        path=path,
        sep=sep[0],
        columns=columns,
        names=names,
        numeric=numeric,
        header_lines=header_lines,
        encoding=encoding,
    )
    try:
        try:
            frame = _read_fast(**read)
        except (pd.errors.ParserError, UnicodeDecodeError):
            raise
        except (ValueError, OverflowError):
            frame = None
        # The fast read only says *that* something is wrong; the checked read says where.
        frame = _read_checked(**read) if frame is None else frame
    except pd.errors.ParserError as exc:
        line = _line_from_parser_error(exc)
        if line is not None and line > header_lines + 1:
            _read_checked(**read, nrows=line - header_lines - 1)  # an earlier bad line wins
        raise DataFormatError(path, line, f"expected {len(names)} fields, found more") from None
    except UnicodeDecodeError:
        raise DataFormatError(path, *locate_decode_error(path, encoding)) from None
    return frame[names].reset_index(drop=True)


def check_file(path: Path) -> None:
    if not path.is_file():
        raise DataFormatError(path, None, "file not found")
    if path.stat().st_size == 0:
        raise DataFormatError(path, None, "file is empty")


def _csv_options(sep: str, columns: list[str], header_lines: int, encoding: str) -> dict:
    # index_col=False: otherwise surplus fields on line 1 silently become the index.
    # skip_blank_lines=False keeps row number == line number - header_lines - 1.
    return dict(
        sep=sep,
        header=None,
        names=columns,
        skiprows=header_lines,
        engine="c",
        encoding=encoding,
        quoting=3,
        keep_default_na=False,
        index_col=False,
        skip_blank_lines=False,
    )


def _read_fast(path, sep, columns, names, numeric, header_lines, encoding) -> pd.DataFrame | None:
    """Parse straight into numeric dtypes; None when some line needs the checked read."""
    gaps = [c for c in columns if c not in names]
    dtypes = {c: numeric.get(c, "float32" if c in gaps else str) for c in columns}
    frame = pd.read_csv(
        path,
        dtype=dtypes,
        na_values={c: [""] for c in gaps},
        **_csv_options(sep, columns, header_lines, encoding),
    )
    suspicious = (
        len(frame) == 0
        or any(not np.isfinite(frame[c].to_numpy()).all() for c in numeric if frame[c].dtype.kind == "f")
        or any(frame[c].notna().any() for c in gaps)
        or (names[-1] not in numeric and frame[names[-1]].eq("").any())
    )
    return None if suspicious else frame


def _read_checked(path, sep, columns, names, numeric, header_lines, encoding, nrows=None) -> pd.DataFrame:
    """Read as strings in chunks, report the first bad line, convert the numeric columns."""
    options = _csv_options(sep, columns, header_lines, encoding)
    chunks = []
    with pd.read_csv(path, dtype=str, chunksize=_CHUNK_ROWS, nrows=nrows, **options) as reader:
        for chunk in reader:
            line = header_lines + 1 + chunk.index.to_numpy()
            values = {column: _to_numeric(chunk[column], dtype) for column, dtype in numeric.items()}
            problems = [_field_count_problem(chunk, columns, names, sep, line)] + [
                _numeric_problem(chunk[column], numeric[column], values[column], line) for column in numeric
            ]
            if any(problems):
                # The earliest line wins; on a tie, the field count (listed first).
                raise DataFormatError(path, *min((p for p in problems if p), key=lambda p: p[0]))
            for column, dtype in numeric.items():
                chunk[column] = values[column].astype(dtype)
            chunks.append(chunk)
    frame = pd.concat(chunks) if chunks else pd.DataFrame()
    if len(frame) == 0:
        raise DataFormatError(path, None, "no data rows")
    return frame


def _field_count_problem(chunk, columns, names, sep, line) -> tuple[int, str] | None:
    gaps = [c for c in columns if c not in names]
    # A short (or empty) line leaves trailing fields empty instead of failing to parse.
    bad = chunk[names[-1]].eq("").to_numpy().copy()
    for gap in gaps:  # "1:2::3::4" puts a value where "::" should be
        bad |= chunk[gap].ne("").to_numpy()
    if not bad.any():
        return None
    sep = "::" if gaps else sep
    return int(line[bad][0]), f"expected {len(names)} fields separated by {sep!r}"


def _to_numeric(column: pd.Series, dtype: str) -> np.ndarray:
    """float64 values; NaN where the text is no number or does not fit `dtype`."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(np.float64, copy=True)
    values[~np.isfinite(values)] = np.nan
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        values[(values != np.round(values)) | (values < info.min) | (values > info.max)] = np.nan
    return values


def _numeric_problem(column: pd.Series, dtype: str, values: np.ndarray, line) -> tuple[int, str] | None:
    bad = np.isnan(values)
    if not bad.any():
        return None
    row = int(np.flatnonzero(bad)[0])
    kind = "a whole number" if np.dtype(dtype).kind in "iu" else "a finite number"
    return int(line[row]), f"{column.name} is not {kind}: {column.iloc[row]!r}"


def _check_first_line(path: Path, sep: str, n_fields: int, header_lines: int, encoding: str) -> None:
    """pandas sizes its columns by `names`, so surplus fields on the first line go unnoticed."""
    first = read_lines(path, encoding, limit=header_lines + 1)[header_lines:]
    if not first:
        raise DataFormatError(path, None, "no data rows")
    found = len(first[0].split(sep))
    if found != n_fields:
        raise DataFormatError(
            path, header_lines + 1, f"expected {n_fields} fields separated by {sep!r}, found {found}"
        )


def read_lines(path: Path, encoding: str, limit: int | None = None) -> list[str]:
    """Lines without their terminators; undecodable bytes are reported by line."""
    check_file(path)
    lines = []
    try:
        with open(path, encoding=encoding, newline="") as f:
            for line in f:
                lines.append(line.rstrip("\r\n"))
                if limit is not None and len(lines) >= limit:
                    break
    except UnicodeDecodeError:
        raise DataFormatError(path, *locate_decode_error(path, encoding)) from None
    return lines


def locate_decode_error(path: Path, encoding: str, block: int = 1 << 23) -> tuple[int | None, str]:
    """(line, problem) for the first undecodable byte, decoding whole lines block by block."""
    lines_before, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            text = carry + data
            cut = len(text) if not data else text.rfind(b"\n") + 1
            part, carry = text[:cut], text[cut:]
            try:
                part.decode(encoding)
            except UnicodeDecodeError as exc:
                line = lines_before + part.count(b"\n", 0, exc.start) + 1
                return line, f"cannot decode byte {part[exc.start]:#04x} as {encoding}"
            lines_before += part.count(b"\n")
            if not data:
                return None, f"cannot decode as {encoding}"


def sniff_encoding(path: Path) -> str:
    """utf-8 when the file decodes as such, else latin-1 (MovieLens 100K/1M titles are latin-1)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    try:
        head.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as exc:
        # A cut at the end of the 1 MiB window is not evidence of latin-1.
        return "utf-8" if exc.start >= len(head) - 3 else "latin-1"


def _line_from_parser_error(exc: Exception) -> int | None:
    import re

    match = re.search(r"line (\d+)", str(exc))
    return int(match.group(1)) if match else None
