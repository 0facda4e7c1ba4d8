"""Sharding over devices: a fit on 4 (forced host) CPU devices gives the 1-device result.

Each configuration runs in its own interpreter, since the device count is fixed when
JAX starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import mcgrad as mg

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    import mcgrad as mg

    x = jnp.linspace(-1.0, 2.0, 8)  # 8 observations: 2 per device

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

    # SGD, not Adam: Adam's g/sqrt(v) turns float rounding of a near-zero gradient (a logit
    # whose Rao-Blackwellized signal nearly cancels) into an O(lr) step.
    result = mg.fit(model, guide, x, key=jax.random.key(0), num_steps=40, optimizer=optax.sgd(0.05),
                    objective=mg.elbo(num_particles=8), progress_bar=False)
    json.dump({
        "device_count": jax.device_count(),
        "data_devices": len(result.args[0].sharding.device_set),
        "params": {name: jnp.ravel(value).tolist() for name, value in result.params.items()},
        "losses": result.losses.tolist(),
        "variance": {name: value.tolist() for name, value in result.diagnostics.variance.items()},
    }, sys.stdout)
    """
)


def launch(num_devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(
        [flag for flag in env.get("XLA_FLAGS", "").split() if "device_count" not in flag]
        + [f"--xla_force_host_platform_device_count={num_devices}", "--xla_backend_optimization_level=0"]
    )
    return subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def collect(process):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout)


def test_fit_on_four_devices_matches_one_device():
    four, one = launch(4), launch(1)  # run side by side
    four, one = collect(four), collect(one)
    assert four["device_count"] == 4 and four["data_devices"] == 4
    assert one["device_count"] == 1 and one["data_devices"] == 1
    for name in one["params"]:
        np.testing.assert_allclose(four["params"][name], one["params"][name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    for name in one["variance"]:
        np.testing.assert_allclose(four["variance"][name], one["variance"][name], rtol=1e-4, err_msg=name)


def test_sharding_helpers_on_one_device():
    keys = jax.random.split(jax.random.key(0), 8)
    mesh = mg.parallel.device_mesh()
    assert mesh.size == jax.device_count()
    if jax.device_count() == 1:
        assert mg.parallel.particle_sharding(8, mesh)(keys) is keys
        tree = {"x": jnp.ones((8, 2)), "n": 3}
        assert mg.parallel.shard_data(tree, mesh) is tree
