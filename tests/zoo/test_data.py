import doctest

import numpy as np

from models import common, data


def test_data_doctests():
    assert doctest.testmod(data).failed == 0


def test_digits_split_is_fixed_and_disjoint():
    first, second = data.binarized_digits(), data.binarized_digits()
    np.testing.assert_array_equal(first.test, second.test)
    assert first.train.shape == (1437, 64) and first.test.shape == (360, 64)
    assert first.train_labels.shape == (1437,)
    continuous = data.digits()
    np.testing.assert_array_equal(first.train, (continuous.train > 0.5).astype(np.float32))


def test_bernoulli_baseline_is_the_smoothed_factorized_nll():
    train = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    baseline = data.bernoulli_baseline(train, train[:1], pseudocount=1.0)
    np.testing.assert_allclose(baseline.probs, [3 / 5, 2 / 5])
    np.testing.assert_allclose(baseline.test_nll, -(np.log(3 / 5) + np.log(3 / 5)), rtol=1e-6)


def test_ring_modes_lie_on_the_circle():
    modes = data.ring_modes(8, radius=2.0)
    np.testing.assert_allclose(np.linalg.norm(modes, axis=1), 2.0, rtol=1e-6)
    samples = data.ring_of_gaussians(500, scale=0.01)
    assert np.abs(np.linalg.norm(samples, axis=1) - 2.0).max() < 0.1


def test_common_parser_and_estimators():
    parser = common.parser("A model.\n\nMore text.", num_steps=7, estimators=True)
    args = parser.parse_args(["--estimator", "score_function", "--no-progress"])
    kwargs = common.run_kwargs(args)
    assert kwargs == {"num_steps": 7, "seed": 0, "output_dir": "outputs", "estimator": "score_function", "progress_bar": False}
    assert common.estimator_from_name("score_function").name == "score_function"
    assert common.estimator_from_name("pathwise").name == "pathwise"
    assert common.estimator_from_name("measure_valued").name == "measure_valued"
    assert common.estimator_from_name("default") is None
    assert common.image_grid(np.zeros((3, 64)), num_cols=2).shape == (17, 17)
