"""Checkpoints that never run code when loaded: a pytree of arrays in one ``.npz`` file.

A pickle checkpoint runs whatever code its file names when it is loaded, so a file from
anyone else is a program. A checkpoint here is an ordinary NumPy ``.npz`` (a zip of
``.npy`` arrays) holding only numbers, read with ``allow_pickle=False``:

- ``description``: a 0-d unicode array, the JSON text
  ``{"format": "mcgrad-checkpoint", "version": 1, "leaves": [...], "metadata": {...}}``.
  ``leaves`` lists, in ``jax.tree_util.tree_flatten_with_path`` order, one record per
  leaf: ``{"path": keystr, "shape": [...], "dtype": name}``, plus ``"key_impl"`` for a
  typed PRNG key array.
- ``leaf_0``, ``leaf_1``, …: the leaves, in the same order; nothing else is in the file.
  A typed key array is stored as its ``jax.random.key_data``
  (``uint32[*shape, *impl_shape]``) and comes back as a key of its recorded
  implementation; a dtype ``.npy`` cannot name (``bfloat16``, the float8 types) is stored
  as unsigned integers of the same width and viewed back.

The file holds the leaves and their paths, not the tree's node types: :func:`load` takes
a template (``like=``, e.g. the freshly initialised state) for those, and checks each
path, shape and dtype against it before filling it in.

Version policy: ``version`` goes up whenever a change would make an older reader misread
a file. A reader reads every version up to its own and refuses newer ones, asking for an
upgrade rather than guessing.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "mcgrad-checkpoint"
VERSION = 1
DESCRIPTION_ENTRY = "description"

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members; an empty zip
_MISMATCH_HINT = (
    "This usually means the file was written by a run with a different model, guide, "
    "optimizer or objective (or their settings) than the run that built the template."
)


class CheckpointError(ValueError):
    """A file that is not a readable mcgrad checkpoint; the message names it and the problem."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose leaves do not fit the template passed as ``like=``."""


def save(path: str | os.PathLike, tree: Any, metadata: dict | None = None) -> None:
    """Write ``tree`` and ``metadata`` to the checkpoint file ``path``, atomically.

    The file is written under a temporary name in the same folder and then renamed over
    ``path``, so a crash leaves either the old checkpoint or the new one, never half of
    one. ``path`` is used as given (no ``.npz`` is added).

    Requires: every leaf is a JAX or NumPy array of a numeric or boolean dtype, a typed
    PRNG key array, or a Python scalar (stored with the dtype ``jnp.asarray`` gives it);
    ``metadata`` is a JSON-serialisable dict (it comes back as JSON gives it: tuples as
    lists).

    Args:
        path: the file to write.
        tree: a pytree (dicts, tuples, lists, NamedTuples such as optax states) of arrays.
        metadata: anything else to keep with it, e.g. the step's settings.

    Raises:
        TypeError: a leaf that is not an array of a storable dtype, or metadata that is
            not JSON-serialisable.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp
        >>> from mcgrad import checkpoints
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "state.npz")
        ...     checkpoints.save(path, {"loc": jnp.zeros(3), "key": jax.random.key(0)}, {"step": 10})
        ...     sorted(os.listdir(folder))
        ['state.npz']
    """
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"checkpoint metadata must be a dict, not {type(metadata).__name__}")
    entries, records = {}, []
    for index, (key_path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        array, record = _stored_leaf(leaf, jax.tree_util.keystr(key_path))
        entries[f"leaf_{index}"] = array
        records.append(record)
    paths = [record["path"] for record in records]
    if len(set(paths)) != len(paths):
        duplicate = next(p for p in paths if paths.count(p) > 1)
        raise TypeError(f"two leaves of the tree share the path {duplicate}; a checkpoint needs distinct paths")
    description = {"format": FORMAT, "version": VERSION, "leaves": records, "metadata": metadata}
    try:
        text = json.dumps(description, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint metadata is not JSON-serialisable: {error}") from error
    entries[DESCRIPTION_ENTRY] = np.array(text)
    _write_atomically(Path(path), entries)


def load(path: str | os.PathLike, like: Any = None) -> tuple[Any, dict]:
    """Read a checkpoint written by :func:`save`; nothing in the file is ever run.

    With ``like``, a pytree of the structure that was saved (e.g. the freshly initialised
    state; its leaves may be arrays, Python scalars or ``jax.ShapeDtypeStruct``), returns
    a tree of that structure holding the file's leaves, after checking that every leaf's
    path, shape and dtype match. Without it, returns a dict from each leaf's path
    (``jax.tree_util.keystr``) to its value.

    Leaves come back as JAX arrays, typed keys as typed keys, bit for bit. A leaf whose
    dtype JAX cannot hold in the current mode (``float64`` without ``jax_enable_x64``)
    comes back as the NumPy array instead of being narrowed.

    Args:
        path: the file to read.
        like: the template tree, or ``None``.

    Returns:
        ``(tree, metadata)``; ``tree`` is a dict of leaves when ``like`` is ``None``.

    Raises:
        CheckpointError: the file is not a checkpoint this mcgrad can read (damaged or
            truncated, not an ``.npz``, a pickle, an entry holding Python objects, another
            format, a newer version).
        CheckpointMismatchError: the file's leaves do not fit ``like``; names the first
            differing leaf path.
        OSError: the file cannot be opened (e.g. ``FileNotFoundError``).

    Example:
        >>> import os, tempfile, jax.numpy as jnp, optax
        >>> from mcgrad import checkpoints
        >>> params = {"loc": jnp.zeros(2)}
        >>> state = (params, optax.adam(1e-2).init(params), jnp.int32(7))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "state.npz")
        ...     checkpoints.save(path, state, {"seed": 0})
        ...     loaded, metadata = checkpoints.load(path, like=state)
        ...     leaves, _ = checkpoints.load(path)
        >>> loaded[2].item(), metadata
        (7, {'seed': 0})
        >>> sorted(leaves)
        ["[0]['loc']", '[1][0].count', "[1][0].mu['loc']", "[1][0].nu['loc']", '[2]']
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        start = file.read(4)
        if start not in _ZIP_MAGIC:
            raise CheckpointError(_not_a_zip_message(path, start))
        file.seek(0)
        try:
            archive = np.load(file, allow_pickle=False)
        except Exception as error:  # any failure to parse untrusted bytes is a bad file
            raise CheckpointError(f"{path}: damaged or incomplete checkpoint (truncated?): {error}") from error
        with archive:
            records, metadata = _read_description(archive, path)
            if like is not None:
                template, treedef = jax.tree_util.tree_flatten_with_path(like)
                _check_fits(path, records, leaf_records(like))
            leaves = [_read_leaf(archive, index, record, path) for index, record in enumerate(records)]
    if like is None:
        return {record["path"]: leaf for record, leaf in zip(records, leaves)}, metadata
    return jax.tree_util.tree_unflatten(treedef, leaves), metadata


# --------------------------------------------------------------------------- writing


def _is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype ``.npy`` stores ``dtype`` as; ``TypeError`` for dtypes a checkpoint refuses."""
    if dtype.kind in "biufc":
        return dtype
    if dtype.kind == "V" and dtype.names is None and dtype.type.__module__.split(".")[0] == "ml_dtypes":
        return np.dtype(f"u{dtype.itemsize}")  # bfloat16, float8_*, int4: same bits as uint
    raise TypeError(f"dtype {dtype} cannot be stored in a checkpoint (numeric and boolean dtypes only)")


def _stored_leaf(leaf: Any, path: str) -> tuple[np.ndarray, dict]:
    """The array to write for ``leaf`` and its record in the description."""
    if isinstance(leaf, (bool, int, float, complex)):
        leaf = jnp.asarray(leaf)
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        raise TypeError(f"leaf {path} is a {type(leaf).__name__}; a checkpoint holds arrays and Python scalars only")
    record = {"path": path, "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
    if _is_key(leaf.dtype):
        record["key_impl"] = str(jax.random.key_impl(leaf))
        return np.asarray(jax.random.key_data(leaf)), record
    array = np.asarray(leaf)
    try:
        storage = _storage_dtype(array.dtype)
    except TypeError as error:
        raise TypeError(f"leaf {path}: {error}") from None
    record["dtype"] = array.dtype.name
    return array.view(storage) if storage != array.dtype else array, record


def _write_atomically(path: Path, entries: dict[str, np.ndarray]) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **entries)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- reading


def _not_a_zip_message(path: str, start: bytes) -> str:
    if not start:
        return f"{path}: not a checkpoint: the file is empty"
    if start[:1] == b"\x80" or start[:1] in (b"(", b"}", b"]"):
        return (
            f"{path}: not a checkpoint: the file looks like a pickle (e.g. written by "
            "mcgrad.fit.save_checkpoint); pickles are never loaded here, because loading one "
            "can run arbitrary code"
        )
    return f"{path}: not a checkpoint: not an .npz (zip) file"


def _read_entry(archive: Any, name: str, path: str) -> np.ndarray:
    if name not in archive.files:
        raise CheckpointError(f"{path}: damaged checkpoint: the entry '{name}' is missing")
    try:
        array = archive[name]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise CheckpointError(
                f"{path}: refused: the entry '{name}' holds Python objects (an object array); "
                "they are never loaded, because unpickling them can run arbitrary code"
            ) from error
        raise CheckpointError(f"{path}: damaged checkpoint: cannot read the entry '{name}': {error}") from error
    except Exception as error:  # zip, CRC and EOF errors from untrusted bytes
        raise CheckpointError(f"{path}: damaged checkpoint: cannot read the entry '{name}': {error}") from error
    if not isinstance(array, np.ndarray):
        raise CheckpointError(f"{path}: damaged checkpoint: the entry '{name}' is not an .npy array")
    return array


def _read_description(archive: Any, path: str) -> tuple[list[dict], dict]:
    if DESCRIPTION_ENTRY not in archive.files:
        raise CheckpointError(
            f"{path}: an .npz file but not an mcgrad checkpoint: it has no '{DESCRIPTION_ENTRY}' entry "
            f"(entries: {', '.join(sorted(archive.files)[:8]) or 'none'})"
        )
    text = _read_entry(archive, DESCRIPTION_ENTRY, path)
    if text.dtype.kind != "U" or text.shape != ():
        raise CheckpointError(f"{path}: not an mcgrad checkpoint: '{DESCRIPTION_ENTRY}' is not a JSON string")
    try:
        description = json.loads(str(text[()]))
    except (ValueError, RecursionError) as error:
        problem = f"'{DESCRIPTION_ENTRY}' is not JSON: {error}"
        raise CheckpointError(f"{path}: not an mcgrad checkpoint: {problem}") from error
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else None
        raise CheckpointError(f"{path}: not an mcgrad checkpoint: its format is {found!r}, not {FORMAT!r}")
    version = description.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: damaged checkpoint: invalid format version {version!r}")
    if version > VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format version {version} by a newer mcgrad; this mcgrad "
            f"reads versions up to {VERSION}: upgrade mcgrad to load it"
        )
    records, metadata = description.get("leaves"), description.get("metadata")
    if not isinstance(records, list) or not all(map(_valid_record, records)) or not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: damaged checkpoint: its description of the leaves is malformed")
    undescribed = set(archive.files) - {DESCRIPTION_ENTRY} - {f"leaf_{index}" for index in range(len(records))}
    if undescribed:
        names = ", ".join(sorted(undescribed))
        raise CheckpointError(f"{path}: damaged checkpoint: entries not in its description: {names}")
    return records, metadata


def _valid_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("path"), str)
        and isinstance(record.get("dtype"), str)
        and isinstance(record.get("shape"), list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in record["shape"])
        and isinstance(record.get("key_impl", ""), str)
    )


def _read_leaf(archive: Any, index: int, record: dict, path: str) -> Any:
    name, shape = f"leaf_{index}", tuple(record["shape"])
    stored = _read_entry(archive, name, path)

    def damaged(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: damaged checkpoint: leaf {record['path']} ('{name}') {problem}")

    if "key_impl" in record:
        if stored.dtype != np.uint32 or stored.shape[: len(shape)] != shape:
            raise damaged(f"holds {stored.dtype}{list(stored.shape)}, not the key data of a key{list(shape)}")
        try:
            key = jax.random.wrap_key_data(stored, impl=record["key_impl"])
        except Exception as error:
            raise damaged(f"is not key data of the implementation {record['key_impl']!r}: {error}") from error
        if key.shape != shape or str(key.dtype) != record["dtype"]:
            raise damaged(f"makes a {key.dtype}{list(key.shape)}, not the recorded {record['dtype']}{list(shape)}")
        return key
    try:
        dtype = np.dtype(jnp.dtype(record["dtype"]))
        storage = _storage_dtype(dtype)
    except TypeError as error:
        raise damaged(f"has an unreadable dtype {record['dtype']!r}") from error
    if stored.dtype != storage or stored.shape != shape:
        raise damaged(f"holds {stored.dtype}{list(stored.shape)}, not the recorded {record['dtype']}{list(shape)}")
    array = stored.view(dtype) if storage != dtype else stored
    return jnp.asarray(array) if jax.dtypes.canonicalize_dtype(dtype) == dtype else array


# --------------------------------------------------------------------------- templates


def _template_record(leaf: Any, path: str) -> dict:
    if isinstance(leaf, (bool, int, float, complex)):
        leaf = jnp.asarray(leaf)
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise TypeError(f"template leaf {path} is a {type(leaf).__name__}, not an array or a Python scalar")
    dtype = str(leaf.dtype) if _is_key(leaf.dtype) else np.dtype(leaf.dtype).name
    return {"path": path, "shape": list(leaf.shape), "dtype": dtype}


def _describe(record: dict) -> str:
    return f"{record['dtype']}[{','.join(map(str, record['shape']))}]"


def _check_fits(path: str, found: list[dict], expected: list[dict]) -> None:
    problem = first_difference(expected, found)
    if problem is not None:
        raise CheckpointMismatchError(f"{path}: the checkpoint does not fit the template: {problem}. {_MISMATCH_HINT}")


def leaf_records(tree: Any) -> list[dict]:
    """Each leaf's path, shape and dtype (arrays, Python scalars, ``jax.ShapeDtypeStruct``).

    Example:
        >>> import jax.numpy as jnp
        >>> leaf_records({"loc": jnp.zeros(2), "step": 3})
        [{'path': "['loc']", 'shape': [2], 'dtype': 'float32'}, {'path': "['step']", 'shape': [], 'dtype': 'int32'}]
    """
    return [_template_record(leaf, jax.tree_util.keystr(p)) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def first_difference(expected: list[dict], found: list[dict], expected_name: str = "the template",
                     found_name: str = "the file") -> str | None:
    """The first leaf where ``found`` does not fit ``expected`` (:func:`leaf_records`), in
    words, or ``None`` where every leaf's path, shape and dtype agree: a checkpoint against
    its template, or a state to resume against a fit's.

    Example:
        >>> import jax.numpy as jnp
        >>> first_difference(leaf_records({"loc": jnp.zeros(2)}), leaf_records({"loc": jnp.zeros(3)}))
        "at leaf ['loc'] the template expects float32[2] but the file has float32[3]"
        >>> first_difference(leaf_records({"loc": jnp.zeros(2)}), leaf_records({"loc": jnp.ones(2)})) is None
        True
    """
    for index, (want, have) in enumerate(zip(expected, found)):
        if want["path"] != have["path"]:
            return f"leaf {index} is {want['path']} in {expected_name} but {have['path']} in {found_name}"
        if (want["shape"], want["dtype"]) != (have["shape"], have["dtype"]):
            return f"at leaf {want['path']} {expected_name} expects {_describe(want)} but {found_name} has {_describe(have)}"
    if len(expected) > len(found):
        first = expected[len(found)]["path"]
        return f"{expected_name} has {len(expected)} leaves, {found_name} {len(found)}; the first missing is {first}"
    if len(found) > len(expected):
        first = found[len(expected)]["path"]
        return f"{found_name} has {len(found)} leaves, {expected_name} {len(expected)}; the first extra is {first}"
    return None
