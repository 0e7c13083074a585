"""The demo's pieces: metrics, data sets, the JSON layout, the plots, and what it
says when a dependency is missing; and one end-to-end run of `main` on the cheap
last-layer curvature only (the full demo takes about 85 s of CPU time)."""

import json

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


def test_auroc_counts_pairs():
    """AUROC = P(confidence in > confidence out), ties one half, by brute force."""
    rng = np.random.default_rng(0)
    inside = rng.dirichlet(np.ones(3), size=40)
    outside = rng.dirichlet(np.ones(3), size=30)
    outside[:5] = inside[:5]  # ties
    a, b = inside.max(axis=1), outside.max(axis=1)
    pairs = (a[:, None] > b[None]).mean() + 0.5 * (a[:, None] == b[None]).mean()
    assert demo.auroc(inside, outside) == pytest.approx(pairs)
    assert demo.auroc(inside, inside) == pytest.approx(0.5)
    sure, unsure = np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])
    assert demo.auroc(sure, unsure) == 1.0 and demo.auroc(unsure, sure) == 0.0


def test_shifted_and_ood_images():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    digits = rng.uniform(size=(6, 64)).astype(np.float32)
    quarter = demo.rotated(digits, 90)  # on the 8x8 grid: exactly np.rot90
    expected = np.rot90(digits.reshape(6, 8, 8), axes=(1, 2)).reshape(6, 64)
    np.testing.assert_allclose(quarter, expected, atol=1e-6)
    np.testing.assert_allclose(demo.rotated(digits, 0), digits, atol=1e-6)
    noisy = np.asarray(demo.pixel_noise(digits, 0.25))
    assert noisy.shape == (6, 64) and 0 <= noisy.min() and noisy.max() <= 1
    assert 0.05 < np.std(noisy - digits) < 0.3
    ood = demo.ood_sets(digits)
    assert set(ood) == {"noise", "inverted", "blurred"}
    np.testing.assert_allclose(ood["inverted"], 1 - digits, atol=1e-6)
    for images in ood.values():
        assert images.shape == (6, 64) and 0 <= images.min() and images.max() <= 1


def fake_evaluation(seed):
    """`evaluate` on random data sets with a random predictive."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=20)
    labelled = {"test": (rng.uniform(size=(20, 64)), labels)}
    labelled |= {
        f"rotated {a}": (rng.uniform(size=(20, 64)), labels) for a in demo.ANGLES
    }
    labelled["pixel noise"] = (rng.uniform(size=(20, 64)), labels)
    ood = {name: rng.uniform(size=(15, 64)) for name in ("noise", "inverted")}

    def predict(inputs):
        logits = inputs[:, :10] * 5
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    result, probs = demo.evaluate(predict, labelled, ood)
    return result, probs, labelled, ood, predict


def test_evaluate_gives_the_json_layout():
    result, probs, labelled, ood, predict = fake_evaluation(0)
    assert set(result) >= {"test", "rotated", "pixel_noise", "ood_auroc"}
    assert set(result["rotated"]) == {"15", "30", "45", "60"}
    assert set(result["ood_auroc"]) == {"noise", "inverted"}
    for metrics in (result["test"], *result["rotated"].values()):
        assert set(metrics) == {"accuracy", "nll", "ece"}
    inputs, labels = labelled["rotated 30"]
    assert result["rotated"]["30"] == demo.calibration(predict(inputs), labels)
    assert result["ood_auroc"]["noise"] == demo.auroc(
        predict(labelled["test"][0]), predict(ood["noise"])
    )
    np.testing.assert_allclose(probs["inverted"], predict(ood["inverted"]))


def test_targets_compare_laplace_ggn_with_map():
    result, *_ = fake_evaluation(0)
    better = {
        "test": result["test"],
        "rotated": {
            a: {k: v / 2 for k, v in m.items()} for a, m in result["rotated"].items()
        },
        "ood_auroc": {"noise": result["ood_auroc"]["noise"] + 0.1},
    }
    assert all(demo.targets({"MAP": result, "Laplace GGN": better}).values())
    assert not any(demo.targets({"MAP": better, "Laplace GGN": result}).values())


def test_prior_comparison_names_the_better_tuning():
    evidence, *_ = fake_evaluation(0)
    validated, *_ = fake_evaluation(1)
    comparison = demo.prior_comparison(
        {"Laplace GGN": evidence, "Laplace GGN (validation λ)": validated}
    )["Laplace GGN"]
    assert set(comparison) == {
        "test",
        "pixel noise",
        *(f"rotated {a}" for a in demo.ANGLES),
        "AUROC noise",
        "AUROC inverted",
    }
    better = (
        "evidence"
        if evidence["rotated"]["30"]["nll"] < validated["rotated"]["30"]["nll"]
        else "validation"
    )
    assert comparison["rotated 30"] == better
    same = demo.prior_comparison(
        {"Laplace GGN": evidence, "Laplace GGN (validation λ)": evidence}
    )
    assert set(same["Laplace GGN"].values()) == {"tie"}


def test_plots_write_pngs(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=50)
    labels = rng.integers(0, 10, size=50)
    path = tmp_path / "reliability.png"
    demo.reliability_diagram({"a": probs, "b": probs**2}, labels, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results, all_probs = {}, {}
    for seed, name in enumerate(("MAP", "Laplace GGN", "Laplace GGN (validation λ)")):
        results[name], all_probs[name], labelled, *_ = fake_evaluation(seed)
    path = tmp_path / "demo.png"
    demo.plot_results(results, all_probs, labelled["test"][1], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_end_to_end_on_the_last_layer(monkeypatch, tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    full = demo.curvatures
    monkeypatch.setattr(
        demo,
        "curvatures",
        lambda *args: {"GGN": full(*args)["GGN last layer"]},
    )
    path = tmp_path / "demo.json"
    argv = ["--epochs", "3", "--no-progress", "--json", str(path)]
    assert demo.main([*argv, "--out", str(tmp_path / "demo.png")]) == 0
    assert "Laplace GGN better than MAP" in capsys.readouterr().out
    setups = json.loads(path.read_text())["setups"]
    assert set(setups) == {"MAP", "Laplace GGN", "Laplace GGN (validation λ)"}
    for result in setups.values():
        assert set(result["rotated"]) == {"15", "30", "45", "60"}
        assert set(result["ood_auroc"]) == {"noise", "inverted", "blurred"}
        assert 0 <= result["test"]["ece"] <= 1 and result["prior_precision"] > 0
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_without_scikit_learn_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(demo, "_has", lambda module: module != "sklearn")
    assert demo.main([]) == 1
    assert 'pip install "fisherops[demo]"' in capsys.readouterr().err
