"""Checkpoints: bit-for-bit round trips, template checks, and refusal of every bad file.

Every bad file must raise ``CheckpointError`` naming its path, and nothing in a file may
run: the hostile files hold an object whose unpickling would create a marker file.
"""

import json
import os
import pickle
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcgrad import checkpoints
from mcgrad.checkpoints import CheckpointError, CheckpointMismatchError


class State(NamedTuple):
    """Like ``mg.FitState``: everything a run needs to resume."""

    params: dict
    optimizer_state: Any
    objective_state: Any
    key: jax.Array
    step: jax.Array


class CreatesMarker:
    """Unpickling this creates the file ``marker``: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_state(num_locations=3, optimizer=None, key_impl="threefry2x32"):
    loc = jnp.array([0.5, -0.0, jnp.nan] + [1.0] * (num_locations - 3))  # -0.0 and NaN test bit for bit
    params = {"loc": loc, "log_scale": jnp.float32(-1.25)}
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    objective_state = {
        "baselines": (optax.EmptyState(), jnp.float32(0.75), None),
        "critic": [jnp.arange(4, dtype=jnp.int32), jnp.ones((2, 2), jnp.bfloat16)],
        "flag": jnp.array(True),
    }
    return State(params, optimizer.init(params), objective_state, jax.random.key(3, impl=key_impl), jnp.int32(41))


def assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert a.dtype == e.dtype
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        assert isinstance(a, jax.Array)
        assert (a.dtype, a.shape) == (e.dtype, e.shape)
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes()


def rewrite_description(path, change):
    """Rewrite the checkpoint at ``path`` with ``change(description)`` as its description."""
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    description = json.loads(str(entries["description"][()]))
    change(description)
    entries["description"] = np.array(json.dumps(description))
    with open(path, "wb") as file:
        np.savez(file, **entries)


@pytest.fixture
def saved(tmp_path):
    state = make_state()
    path = tmp_path / "state.ckpt"
    checkpoints.save(path, state, {"num_steps": 100, "estimator": "score_function", "losses": [1.5, 0.25]})
    return path, state


# --------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_for_bit(saved):
    path, state = saved
    loaded, metadata = checkpoints.load(path, like=state)
    assert_bitwise_equal(loaded, state)
    assert isinstance(loaded, State) and isinstance(loaded.optimizer_state[0], optax.ScaleByAdamState)
    assert loaded.objective_state["baselines"][2] is None
    assert metadata == {"num_steps": 100, "estimator": "score_function", "losses": [1.5, 0.25]}


def test_loaded_state_steps_like_the_original(saved):
    path, state = saved
    loaded, _ = checkpoints.load(path, like=state)
    gradient = {"loc": jnp.ones(3), "log_scale": jnp.float32(2.0)}
    optimizer = optax.adam(1e-2)
    updates = [optimizer.update(gradient, s.optimizer_state)[0] for s in (loaded, state)]
    assert_bitwise_equal(*updates)
    assert_bitwise_equal(jax.random.split(loaded.key), jax.random.split(state.key))


def test_round_trip_of_chained_optimizer_and_other_key_impl(tmp_path):
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4), optax.adam(1e-2))
    state = make_state(optimizer=optimizer, key_impl="rbg")
    checkpoints.save(tmp_path / "state.npz", state)
    loaded, metadata = checkpoints.load(tmp_path / "state.npz", like=state)
    assert_bitwise_equal(loaded, state)
    assert metadata == {}


def test_template_may_be_shapes_and_python_scalars(tmp_path):
    tree = {"step": 3, "scale": 0.5, "keys": jax.random.split(jax.random.key(0), 2)}
    checkpoints.save(tmp_path / "c", tree)
    loaded, _ = checkpoints.load(tmp_path / "c", like=jax.eval_shape(lambda: tree))
    assert loaded["step"].dtype == jnp.asarray(3).dtype and loaded["step"].item() == 3
    assert loaded["scale"].item() == 0.5
    assert_bitwise_equal(loaded["keys"], tree["keys"])


def test_without_template_returns_leaves_by_path(saved):
    path, state = saved
    leaves, _ = checkpoints.load(path)
    assert list(leaves) == [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert leaves[".step"].item() == 41
    assert_bitwise_equal(leaves[".key"], state.key)
    assert_bitwise_equal(leaves[".optimizer_state[0].count"], state.optimizer_state[0].count)


def test_dtype_jax_cannot_hold_stays_numpy(tmp_path):
    tree = {"x": np.array([0.1, 1e-300], np.float64)}
    checkpoints.save(tmp_path / "c", tree)
    loaded, _ = checkpoints.load(tmp_path / "c", like=tree)
    expected_type = jax.Array if jax.config.jax_enable_x64 else np.ndarray
    assert isinstance(loaded["x"], expected_type) and np.asarray(loaded["x"]).tobytes() == tree["x"].tobytes()


# --------------------------------------------------------------------------- template mismatches


@pytest.mark.parametrize(
    "template, leaf_path, words",
    [
        (make_state(num_locations=4), ".params['loc']", "float32[3]"),
        (make_state()._replace(step=jnp.float32(41)), ".step", "int32[]"),
        (make_state(key_impl="rbg"), ".key", "key<fry>[]"),
        (make_state(optimizer=optax.sgd(1e-2)), ".optimizer_state[0]", "optimizer"),
        (make_state()._replace(objective_state={}), ".objective_state['baselines'][1] in the file", ".key in"),
        (make_state()._replace(step=(jnp.int32(41),)), ".step[0] in the template", ".step in the file"),
    ],
    ids=["shape", "dtype", "key impl", "optimizer", "leaves missing", "other container"],
)
def test_template_mismatch_names_the_leaf(saved, template, leaf_path, words):
    path, _ = saved
    with pytest.raises(CheckpointMismatchError) as error:
        checkpoints.load(path, like=template)
    message = str(error.value)
    assert str(path) in message and leaf_path in message and words in message
    assert "different model, guide, optimizer or objective" in message
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("template, words", [((1.0,), "first extra is [1]"), ((1.0, 2, 3.0), "first missing is [2]")])
def test_template_with_other_leaf_count(tmp_path, template, words):
    checkpoints.save(tmp_path / "c", (1.0, 2))
    with pytest.raises(CheckpointMismatchError, match=re.escape(words)):
        checkpoints.load(tmp_path / "c", like=template)


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99, -1])
def test_truncated_file(saved, keep):
    path, state = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1] if keep == -1 else data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=str(path)):
        checkpoints.load(path, like=state)


@pytest.mark.parametrize("start", [b"", b"PK\x03\x04"], ids=["random", "zip magic then random"])
def test_random_bytes(tmp_path, start):
    path = tmp_path / "noise.npz"
    path.write_bytes(start + np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=str(path)):
        checkpoints.load(path)


def test_pickle_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "old.ckpt", tmp_path / "marker"
    path.write_bytes(pickle.dumps({"state": CreatesMarker(marker)}))
    with pytest.raises(CheckpointError, match="pickle") as error:
        checkpoints.load(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["leaf_0", "description"])
def test_object_array_is_refused_without_running_it(saved, entry):
    path, state = saved
    marker = path.parent / "marker"
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    entries[entry] = np.array([CreatesMarker(marker)], dtype=object)
    with open(path, "wb") as file:
        np.savez(file, **entries)
    with pytest.raises(CheckpointError, match="Python objects") as error:
        checkpoints.load(path, like=state)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_npz_without_description(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, leaf_0=np.ones(3))
    with pytest.raises(CheckpointError, match="no 'description' entry") as error:
        checkpoints.load(path)
    assert str(path) in str(error.value)


def test_npy_file(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.ones(3))
    with pytest.raises(CheckpointError, match=str(path)):
        checkpoints.load(path)


def test_newer_version_asks_for_an_upgrade(saved):
    path, state = saved
    rewrite_description(path, lambda description: description.update(version=checkpoints.VERSION + 1))
    with pytest.raises(CheckpointError, match="newer mcgrad") as error:
        checkpoints.load(path, like=state)
    assert str(path) in str(error.value) and "upgrade" in str(error.value)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.update(format="orbax"), "format is 'orbax'"),
        (lambda d: d.update(version="1"), "invalid format version"),
        (lambda d: d["leaves"][0].update(shape=[5]), "damaged"),
        (lambda d: d["leaves"][0].update(dtype="object"), "unreadable dtype"),
        (lambda d: d["leaves"].pop(), "entries not in its description: leaf_12"),
        (lambda d: d["leaves"].append(d["leaves"][0]), "entry 'leaf_"),
        (lambda d: d.pop("metadata"), "malformed"),
    ],
    ids=["format", "version", "shape", "dtype", "leaf count", "missing entry", "no metadata"],
)
def test_inconsistent_description(saved, change, words):
    path, _ = saved
    rewrite_description(path, change)
    with pytest.raises(CheckpointError, match=words) as error:
        checkpoints.load(path)
    assert str(path) in str(error.value)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoints.load(tmp_path / "absent.npz")


# --------------------------------------------------------------------------- saving


def test_save_is_atomic_and_overwrites(saved):
    path, state = saved
    checkpoints.save(path, state._replace(step=jnp.int32(42)))
    assert os.listdir(path.parent) == [path.name]
    assert checkpoints.load(path, like=state)[0].step.item() == 42


def test_failed_save_keeps_the_old_file_and_no_temporary(saved, monkeypatch):
    path, state = saved

    def fail_midway(file, **entries):
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(path, state._replace(step=jnp.int32(42)))
    assert os.listdir(path.parent) == [path.name]
    assert checkpoints.load(path, like=state)[0].step.item() == 41


@pytest.mark.parametrize(
    "tree, metadata, words",
    [
        ({"name": "adam"}, None, "leaf \\['name'\\] is a str"),
        ({"x": np.array(["a"])}, None, "cannot be stored"),
        ({"x": np.array([object()])}, None, "cannot be stored"),
        ({"x": jnp.ones(1)}, {"seed": object()}, "JSON-serialisable"),
        ({"x": jnp.ones(1)}, [1, 2], "must be a dict"),
    ],
)
def test_save_refuses_what_it_cannot_store(tmp_path, tree, metadata, words):
    with pytest.raises(TypeError, match=words):
        checkpoints.save(tmp_path / "c", tree, metadata)
    assert os.listdir(tmp_path) == []
