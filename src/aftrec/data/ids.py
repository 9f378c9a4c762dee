"""Id columns held as text, and the operations on ids that preparing a log needs.

Text ids (a CSV file's, so that "007" and "7" stay two) are kept as pyarrow strings
(:data:`TEXT`), not as Python str objects: a few bytes an id instead of a Python object
each, and pyarrow's hash kernels number them (:func:`factorize`), find them in a catalogue
(:func:`positions`) and find repeated rows (:func:`duplicated`). Other columns (integer
ids, and text held otherwise) take pandas' routines, with the same results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

#: the pandas type of text ids: pyarrow strings with missing values NaN (pandas 3's "str")
TEXT = pd.StringDtype("pyarrow", na_value=np.nan)


def as_text(values: pd.Series) -> pd.Series:
    """``values`` as text ids (:data:`TEXT`, missing values NaN)."""
    if values.dtype == TEXT:  # a CSV file's ids, as pandas 3 reads them: nothing to do
        return values
    return values.astype("string").astype(TEXT)


def _arrow_text_dtype(dtype: Any) -> bool:
    if isinstance(dtype, pd.StringDtype):
        return bool(dtype.storage == "pyarrow")
    if isinstance(dtype, pd.ArrowDtype):
        kind = dtype.pyarrow_dtype
        return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))
    return False


def arrow_text(values: pd.Series | pd.Index) -> pa.ChunkedArray | None:
    """``values`` as pyarrow strings, without a copy, when pandas holds them so (:data:`TEXT`,
    ``string[pyarrow]``, ``ArrowDtype`` strings); otherwise ``None``."""
    if not _arrow_text_dtype(values.dtype):
        return None
    data = pa.array(values)
    return data if isinstance(data, pa.ChunkedArray) else pa.chunked_array([data])


def factorize(values: pd.Series | pd.Index, sort: bool = False) -> tuple[np.ndarray, pd.Index]:
    """``pd.factorize(values, sort=sort)``: each value's code (-1 for a missing one) and the
    distinct values, in order of appearance or (``sort``) sorted. Text is numbered by pyarrow,
    which sorts it by its UTF-8 bytes: by code point, as Python sorts str."""
    data = arrow_text(values)
    if data is None:
        codes, uniques = pd.factorize(values, sort=sort)
        return codes, pd.Index(uniques)
    encoded = pc.dictionary_encode(data)
    # the chunks share one dictionary (pyarrow encodes a chunked array with one hash table)
    distinct = encoded.chunk(0).dictionary if encoded.num_chunks else pa.array([], data.type)
    if not all(chunk.dictionary.equals(distinct) for chunk in encoded.chunks[1:]):
        encoded = pa.chunked_array([pc.dictionary_encode(data.combine_chunks())])
        distinct = encoded.chunk(0).dictionary
    indices = [chunk.indices.fill_null(-1).to_numpy() for chunk in encoded.chunks]
    codes = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int32)
    if sort and len(distinct):
        order = pc.array_sort_indices(distinct).to_numpy()
        rank = np.empty(len(order) + 1, dtype=np.intp)
        rank[order] = np.arange(len(order))
        rank[-1] = -1  # a missing value's code, -1, stays -1
        distinct = distinct.take(order)
        codes = rank[codes]
    else:
        codes = codes.astype(np.intp)
    return codes, pd.Index(pd.array(distinct, dtype=values.dtype))


def positions(index: pd.Index, values: pd.Series | pd.Index) -> np.ndarray:
    """``index.get_indexer(values)``: the position of each value in ``index`` (unique), -1
    where it is not there; by pyarrow's hash kernel when both are pyarrow strings."""
    where, data = arrow_text(index), arrow_text(values)
    if where is None or data is None:
        return index.get_indexer(pd.Index(values))
    found = pc.index_in(data, value_set=where.combine_chunks().cast(data.type))
    return found.fill_null(-1).to_numpy().astype(np.intp)


def duplicated(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """``frame.duplicated(columns, keep=False)`` as a bool array: the rows whose values in
    ``columns`` are those of another row.

    Only rows whose first two columns (the ids) repeat together can be such rows; they are
    found first, from one int64 per row made of the two columns' codes (equal ids give equal
    numbers, and two pairs that meet in one number only add rows to compare), and pandas
    compares those rows alone in full. The full comparison would hash every row's
    timestamp, most of the time spent."""
    first, second = (factorize(frame[col])[0].astype(np.int64, copy=False) for col in columns[:2])
    pair = first * (int(second.max(initial=0)) + 1) + second
    maybe = np.flatnonzero(pd.Series(pair).duplicated(keep=False).to_numpy())
    dup = np.zeros(len(frame), dtype=bool)
    if len(maybe):
        dup[maybe] = frame.iloc[maybe].duplicated(list(columns), keep=False).to_numpy()
    return dup
