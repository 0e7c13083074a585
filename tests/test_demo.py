"""The demo's metrics, its plot, and what it says when scikit-learn is missing."""

import numpy as np
import pytest

from fisherops import demo


def test_calibration_by_hand():
    probs = np.array(
        [
            [0.9, 0.1],  # confident, right
            [0.8, 0.2],  # confident, wrong
            [0.3, 0.7],  # right
            [0.45, 0.55],  # wrong
        ]
    )
    labels = np.array([0, 1, 1, 0])
    metrics = demo.calibration(probs, labels, num_bins=2)
    assert metrics["accuracy"] == pytest.approx(0.5)
    expected_nll = -np.mean(np.log([0.9, 0.2, 0.7, 0.45]))
    assert metrics["nll"] == pytest.approx(expected_nll)
    # Bin [0.5, 1): all four points. Accuracy 2/4, mean confidence 0.7375.
    assert metrics["ece"] == pytest.approx(abs(0.5 - (0.9 + 0.8 + 0.7 + 0.55) / 4))
    four_bins = demo.calibration(probs, labels, num_bins=4)
    # Bins [0.5, 0.75): 0.7 right, 0.55 wrong; [0.75, 1): 0.9 right, 0.8 wrong.
    assert four_bins["ece"] == pytest.approx(
        (abs(1 - 0.7 - 0.55) + abs(1 - 0.9 - 0.8)) / 4
    )


def test_reliability_diagram_writes_a_png(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=50)
    labels = rng.integers(0, 10, size=50)
    path = tmp_path / "reliability.png"
    demo.reliability_diagram({"a": probs, "b": probs**2}, labels, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_scikit_learn_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(demo, "_has", lambda module: module != "sklearn")
    assert demo.main([]) == 1
    assert 'pip install "fisherops[demo]"' in capsys.readouterr().err
