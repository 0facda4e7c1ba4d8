"""Multi-process data parallelism on JAX's own distributed runtime (``jax.distributed``).

Two processes on 127.0.0.1, each with 2 forced host CPU devices, join into one 4-device
mesh (CPU collectives over gloo) and run the same ``mg.fit``; the result must be the one a
single process gets with 4 devices and with 1, to float rounding. Every configuration runs
in its own interpreter (the device count and the distributed runtime are fixed when JAX
starts), all side by side; every wait has a timeout and stray processes are killed.

The data reach the mesh both ways mcgrad supports: the whole data set on every process
(``shard_data`` keeps each process's part) and each process's own rows joined with
``mg.parallel.from_process_local``.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcgrad as mg

TIMEOUT_S = 240  # per process; a hung collective fails the test instead of blocking it

SCRIPT = textwrap.dedent(
    """
    import json, sys, time, traceback
    start = time.perf_counter()
    import jax
    num_processes, process_id, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if num_processes > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
                                   coordinator_bind_address=f"127.0.0.1:{port}",  # loopback only
                                   initialization_timeout=60, shutdown_timeout_seconds=30)
    import jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist, optax
    import mcgrad as mg

    x = np.linspace(-1.0, 2.0, 8, dtype=np.float32)  # 8 observations: 2 per device of 4
    rows = x.shape[0] // jax.process_count()
    own_rows = x[process_id * rows:(process_id + 1) * rows]

    def model(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            b = numpyro.sample("b", dist.Bernoulli(0.3))
            numpyro.sample("x", dist.Normal(z + b, 1.0), obs=x)

    def guide(x):
        loc = numpyro.param("loc", 0.0)
        scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
        logits = numpyro.param("logits", jnp.full(x.shape[0], 0.3))
        numpyro.sample("z", dist.Normal(loc, scale))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("b", dist.Bernoulli(logits=logits))

    def read(tree):  # on every process: a collective for arrays no process holds whole
        return jax.tree.map(lambda leaf: np.ravel(leaf).tolist(), mg.parallel.to_host(tree))

    def run(data):
        # SGD, not Adam: Adam's g/sqrt(v) turns float rounding of a near-zero gradient into an O(lr) step.
        try:
            result = mg.fit(model, guide, data, key=jax.random.key(0), num_steps=40, optimizer=optax.sgd(0.05),
                            objective=mg.elbo(num_particles=8), progress_bar=False)
        except Exception as error:  # the same on every process, before any collective
            frames = [f for f in traceback.extract_tb(error.__traceback__) if "/mcgrad/" in f.filename]
            where = f" (at {frames[-1].filename.split('/mcgrad/')[-1]}:{frames[-1].lineno})" if frames else ""
            return {"error": f"{type(error).__name__}: {error}{where}"}
        data = jnp.asarray(result.args[0])  # NumPy data stays on the host with one device
        return {
            "data_devices": len(data.sharding.device_set),
            "data_fully_addressable": data.is_fully_addressable,
            "params": read(result.params),
            "losses": read(result.losses),
            "variance": read(result.diagnostics.variance),
        }

    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "collectives": jax.config.jax_cpu_collectives_implementation,
        "whole": run(x),
        "process_local": run(mg.parallel.from_process_local(own_rows)),
    }
    infinite = own_rows.copy()
    infinite[-1] = np.inf if process_id == jax.process_count() - 1 else infinite[-1]  # only the last process's rows
    report["infinite_data_error"] = run(mg.parallel.from_process_local(infinite)).get("error")
    laid_out = mg.parallel.from_process_local(own_rows)
    report["shard_data_keeps_global_arrays"] = mg.parallel.shard_data(laid_out) is laid_out
    try:
        mg.parallel.from_process_local(own_rows[:3])
        report["uneven_rows_error"] = None
    except ValueError as error:
        report["uneven_rows_error"] = str(error)
    report["seconds"] = time.perf_counter() - start
    print()
    print(json.dumps(report))
    """
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(num_processes: int, process_id: int, num_devices: int, port: int) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(
        [flag for flag in env.get("XLA_FLAGS", "").split() if "device_count" not in flag]
        + [f"--xla_force_host_platform_device_count={num_devices}", "--xla_backend_optimization_level=0"]
    )
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(num_processes), str(process_id), str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def collect(process: subprocess.Popen, name: str) -> dict:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, f"{name} exited with {process.returncode}:\n{stderr[-3000:]}"
    return json.loads(stdout.splitlines()[-1])  # gloo prints its connection lines to stdout first


@pytest.fixture(scope="module")
def runs() -> dict:
    """Two processes × 2 devices, one process × 4 devices, one process × 1 device."""
    port = free_port()
    processes = {
        "process 0 of 2": launch(2, 0, 2, port),
        "process 1 of 2": launch(2, 1, 2, port),
        "4 devices": launch(1, 0, 4, 0),
        "1 device": launch(1, 0, 1, 0),
    }
    try:
        return {name: collect(process, name) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


def assert_same_fit(fit: dict, reference: dict, rtol: float = 1e-5) -> None:
    for name in reference["params"]:
        np.testing.assert_allclose(fit["params"][name], reference["params"][name], rtol=rtol, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(fit["losses"], reference["losses"], rtol=rtol, atol=1e-5)
    for name in reference["variance"]:
        np.testing.assert_allclose(fit["variance"][name], reference["variance"][name], rtol=1e-4, err_msg=name)


def test_runtimes_joined(runs):
    first, second = runs["process 0 of 2"], runs["process 1 of 2"]
    assert [first["process_index"], second["process_index"]] == [0, 1]
    for report in first, second:
        assert report["process_count"] == 2 and report["device_count"] == 4 and report["local_device_count"] == 2
        assert report["collectives"] == "gloo"
    assert runs["4 devices"]["device_count"] == 4 and runs["1 device"]["device_count"] == 1


def check_fitted(*fits: dict) -> None:
    for fit in fits:
        assert "error" not in fit, fit["error"]


@pytest.mark.parametrize("layout", ["whole", "process_local"])
def test_two_processes_match_one_process(runs, layout):
    first, second = runs["process 0 of 2"][layout], runs["process 1 of 2"][layout]
    check_fitted(first, second, runs["4 devices"][layout], runs["1 device"][layout])
    for fit in first, second:  # the data span both processes' devices; no process holds all of it
        assert fit["data_devices"] == 4 and not fit["data_fully_addressable"]
    assert first == second  # every process gets the same result back
    assert runs["4 devices"][layout]["data_devices"] == 4 and runs["1 device"][layout]["data_devices"] == 1
    assert_same_fit(first, runs["4 devices"][layout])
    assert_same_fit(first, runs["1 device"][layout])


def test_whole_and_process_local_data_give_one_fit(runs):
    check_fitted(*(report[layout] for report in runs.values() for layout in ("whole", "process_local")))
    for name in runs:
        assert runs[name]["process_local"]["params"] == runs[name]["whole"]["params"], name


def test_infinite_data_refused_on_every_process(runs):
    """Only the last process holds the bad row; every process must raise (none may wait
    alone in a collective)."""
    for name, report in runs.items():
        error = report["infinite_data_error"] or ""
        assert error.startswith("ValueError") and "1 infinite value" in error, (name, error)


def test_helpers_across_processes(runs):
    for name, report in runs.items():
        assert report["shard_data_keeps_global_arrays"], name
    for name in "process 0 of 2", "process 1 of 2":  # 3 rows over 2 local devices
        assert "do not divide evenly over its 2 devices" in runs[name]["uneven_rows_error"]
    assert "do not divide evenly over its 4 devices" in runs["4 devices"]["uneven_rows_error"]
    assert runs["1 device"]["uneven_rows_error"] is None


def test_from_process_local_in_one_process():
    rows = np.arange(4.0 * jax.local_device_count() * 2).reshape(-1, 2)
    joined = mg.parallel.from_process_local({"x": rows, "n": 3, "scale": np.float32(2.0)})
    assert joined["n"] == 3 and joined["scale"].shape == ()
    np.testing.assert_array_equal(joined["x"], rows)
    assert joined["x"].sharding.device_set == set(jax.devices())
    assert mg.parallel.shard_data(joined["x"]) is joined["x"]
    np.testing.assert_array_equal(mg.parallel.shard_data(jnp.asarray(rows)), rows)
    host = mg.parallel.to_host({"x": joined["x"], "n": 3, "loss": jnp.float32(1.5)})
    assert isinstance(host["x"], np.ndarray) and host["n"] == 3 and host["loss"].shape == ()
    np.testing.assert_array_equal(host["x"], rows)
