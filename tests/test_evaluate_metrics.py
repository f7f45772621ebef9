"""FID, IS and precision/recall against independent float64 NumPy/SciPy computations; the
FID retry path; batched npz reading; reference-batch handling and its error messages."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
from flax import nnx

from hmar_jax.evaluate import metrics
from hmar_jax.evaluate.__main__ import main as evaluate_main


def _random_features(seed, n, d, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing + shift


def _fid_by_eigenvalues(a, b):
    """Independent FID: tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root


def test_frechet_distance_matches_independent_computation():
    a, b = _random_features(0, 300, 12), _random_features(1, 250, 12, shift=0.3)
    got = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
    np.testing.assert_allclose(got, _fid_by_eigenvalues(a, b), rtol=1e-9)
    same = metrics.feature_statistics(a)
    assert abs(metrics.frechet_distance(*same, *same)) < 1e-8
    with pytest.raises(ValueError, match="Statistics do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_frechet_distance_retries_with_diagonal_offset(monkeypatch):
    a, b = _random_features(2, 100, 5), _random_features(3, 100, 5)
    (mu1, s1), (mu2, s2) = metrics.feature_statistics(a), metrics.feature_statistics(b)
    calls = []
    real_sqrtm = metrics.scipy_sqrtm

    def flaky_sqrtm(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics, "scipy_sqrtm", flaky_sqrtm)
    with pytest.warns(RuntimeWarning, match="retrying with 1e-06"):
        got = metrics.frechet_distance(mu1, s1, mu2, s2)
    offset = np.eye(5) * 1e-6
    np.testing.assert_allclose(calls[0], s1 @ s2)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    expected = (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(real_sqrtm((s1 + offset) @ (s2 + offset))).real)
    np.testing.assert_allclose(got, expected, rtol=1e-12)

    monkeypatch.setattr(metrics, "scipy_sqrtm", lambda m: np.eye(len(m)) * (1 + 1j))
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance(mu1, s1, mu2, s2)


def test_inception_score_matches_independent_computation():
    logits = np.random.default_rng(4).standard_normal((103, 7)) * 3
    expected = []
    for part in np.array_split(scipy.special.softmax(logits, axis=1), 10):
        marginal = part.mean(axis=0)
        expected.append(np.exp(np.mean([scipy.special.rel_entr(p, marginal).sum() for p in part])))
    np.testing.assert_allclose(metrics.inception_score(logits), np.mean(expected), rtol=1e-10)
    assert metrics.inception_score(np.zeros((50, 9))) == pytest.approx(1.0)
    confident = np.tile(np.eye(5) * 60.0, (10, 1))  # each split: every class equally often
    assert metrics.inception_score(confident) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="num_splits"):
        metrics.inception_score(np.zeros((5, 3)))


def _precision_recall_reference(ref, samples, k=3):
    d_ref = scipy.spatial.distance.cdist(ref, ref, "sqeuclidean")
    d_sam = scipy.spatial.distance.cdist(samples, samples, "sqeuclidean")
    r_ref, r_sam = np.sort(d_ref, axis=1)[:, k], np.sort(d_sam, axis=1)[:, k]
    cross = scipy.spatial.distance.cdist(samples, ref, "sqeuclidean")  # [N, M]
    precision = (cross <= r_ref[None, :]).any(axis=1).mean()
    recall = (cross <= r_sam[:, None]).any(axis=0).mean()
    return r_ref, precision, recall


def test_precision_recall_match_independent_computation_across_blocks():
    ref = _random_features(5, 61, 6).astype(np.float32)
    samples = _random_features(6, 45, 6, shift=0.4).astype(np.float32)
    r_ref, precision, recall = _precision_recall_reference(ref, samples)
    assert 0.1 < precision < 0.95 and 0.1 < recall < 0.95  # a non-trivial case
    for block in (16, 10000):  # padded tiles, and one tile
        np.testing.assert_allclose(metrics.manifold_radii(ref, 3, block), r_ref, rtol=1e-4)
        assert metrics.precision_recall(ref, samples, block=block) == (precision, recall)
    assert metrics.precision_recall(ref, ref, block=16) == (1.0, 1.0)
    with pytest.raises(ValueError, match="different dimensions"):
        metrics.precision_recall(ref, samples[:, :3])


def _write_images(path, n, seed, size=8, **extra):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, **extra)
    return images


def _fake_features(batch):
    """A cheap stand-in for the Inception: deterministic per image."""
    x = np.asarray(batch, np.float64).reshape(len(batch), -1) / 255.0
    return {"pool": x[:, :16] + x[:, 16:32] ** 2, "spatial": x[:, :10],
            "logits": 5 * x[:, :12]}


def test_npz_batches_stream_in_order(tmp_path):
    images = _write_images(tmp_path / "plain.npz", 10, 0)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    for name in ("plain.npz", "compressed.npz"):
        with metrics.open_npz_array(tmp_path / name, "arr_0") as reader:
            assert reader.shape == (10, 8, 8, 3) and len(reader) == 10
            batches = list(reader.read_batches(4))
        assert [len(b) for b in batches] == [4, 4, 2]
        np.testing.assert_array_equal(np.concatenate(batches), images)
    seen = []

    def feature_fn(batch):
        seen.append(len(batch))
        return _fake_features(batch)

    acts = metrics.compute_activations(tmp_path / "plain.npz", feature_fn, batch_size=4)
    assert seen == [4, 4, 2]
    for key, value in _fake_features(images).items():
        np.testing.assert_allclose(acts[key], value, rtol=1e-6)


def test_feature_fn_pads_and_shards_batches():
    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(12.0).reshape(3, 4))

        def __call__(self, images):
            x = images.astype(jnp.float32).mean(axis=(1, 2))  # [N, 3]
            return {"pool": x @ self.w[...]}

    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    expected = images.astype(np.float32).mean(axis=(1, 2)) @ np.arange(12.0).reshape(3, 4)
    assert jax.local_device_count() == 8  # tests/conftest.py
    for batch_size in (8, 7):  # sharded over the 8 devices / on one device
        out = metrics.make_feature_fn(Tiny(), batch_size)(images)["pool"]
        np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_evaluate_end_to_end_with_stored_and_computed_reference_statistics(tmp_path):
    samples = _write_images(tmp_path / "samples.npz", 20, 1)
    ref_images = _write_images(tmp_path / "ref.npz", 12, 2)
    report = metrics.evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", _fake_features,
                              batch_size=8, block=5)
    s, r = _fake_features(samples), _fake_features(ref_images)
    fid = metrics.frechet_distance(*metrics.feature_statistics(s["pool"]),
                                   *metrics.feature_statistics(r["pool"]))
    assert report["fid"] == pytest.approx(fid, rel=1e-6)
    assert report["sfid"] == pytest.approx(metrics.frechet_distance(
        *metrics.feature_statistics(s["spatial"]), *metrics.feature_statistics(r["spatial"])),
        rel=1e-6)
    inception_score = metrics.inception_score(s["logits"])
    assert report["inception_score"] == pytest.approx(inception_score, rel=1e-6)
    _, precision, recall = _precision_recall_reference(r["pool"], s["pool"])
    assert (report["precision"], report["recall"]) == (precision, recall)
    assert report["num_samples"] == 20 and report["num_reference"] == 12
    # Stored statistics (OpenAI's files carry them) take precedence over the images'.
    stats = {"mu": np.ones(16), "sigma": np.eye(16), "mu_s": np.zeros(10), "sigma_s": np.eye(10)}
    np.savez(tmp_path / "ref_stats.npz", arr_0=ref_images, **stats)
    stored = metrics.evaluate(tmp_path / "samples.npz", tmp_path / "ref_stats.npz",
                              _fake_features, batch_size=8)
    assert stored["fid"] == pytest.approx(metrics.frechet_distance(
        *metrics.feature_statistics(s["pool"]), stats["mu"], stats["sigma"]), rel=1e-6)


def test_input_errors_name_the_problem_and_the_fix(tmp_path):
    _write_images(tmp_path / "samples.npz", 12, 0)
    with pytest.raises(FileNotFoundError) as err:
        metrics.evaluate(tmp_path / "samples.npz", tmp_path / "VIRTUAL_imagenet256_labeled.npz",
                         _fake_features)
    message = str(err.value)
    assert "guided-diffusion" in message and metrics.REFERENCE_FILE in message
    assert "must supply" in message and "--ref" in message
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="no 'arr_0' reference images"):
        metrics.evaluate(tmp_path / "samples.npz", tmp_path / "stats_only.npz", _fake_features)
    _write_images(tmp_path / "ref.npz", 12, 1)
    np.savez(tmp_path / "wrong_key.npz", images=np.zeros((12, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"has no array 'arr_0' \(it has \['images'\]\)"):
        metrics.evaluate(tmp_path / "wrong_key.npz", tmp_path / "ref.npz", _fake_features)
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((12, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="expected uint8 images"):
        metrics.evaluate(tmp_path / "floats.npz", tmp_path / "ref.npz", _fake_features)
    (tmp_path / "not_npz.npz").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz archive"):
        metrics.evaluate(tmp_path / "samples.npz", tmp_path / "not_npz.npz", _fake_features)


def test_metrics_cli_reports_a_missing_reference_in_one_line(tmp_path, capsys):
    _write_images(tmp_path / "samples.npz", 12, 0)
    code = evaluate_main(["metrics", "--samples", str(tmp_path / "samples.npz"),
                          "--ref", str(tmp_path / "VIRTUAL_imagenet256_labeled.npz"),
                          "--inception", str(tmp_path / "inception")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "VIRTUAL_imagenet256_labeled.npz" in err and "guided-diffusion" in err
    _write_images(tmp_path / "ref.npz", 12, 1)
    code = evaluate_main(["metrics", "--samples", str(tmp_path / "samples.npz"),
                          "--ref", str(tmp_path / "ref.npz"), "--inception", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "python -m hmar_jax.convert inception" in err, err


def test_metrics_cli_prints_and_writes_all_numbers(tmp_path, capsys, monkeypatch):
    from hmar_jax.evaluate import inception

    class FakeInception(nnx.Module):
        """Stands in for the converted network (covered by tests/test_inception.py)."""

        def __call__(self, images):
            x = images.astype(jnp.float32).reshape(len(images), -1) / 255.0
            return {"pool": x[:, :16] + x[:, 16:32] ** 2, "spatial": x[:, :10],
                    "logits": 5 * x[:, :12]}

    loaded = []
    monkeypatch.setattr(inception, "load_inception",
                        lambda directory, **kw: loaded.append((directory, kw)) or FakeInception())
    _write_images(tmp_path / "samples.npz", 20, 1)
    _write_images(tmp_path / "ref.npz", 12, 2)
    argv = ["metrics", "--samples", str(tmp_path / "samples.npz"), "--ref",
            str(tmp_path / "ref.npz"), "--inception", "INCEPTION_DIR", "--batch-size", "8",
            "--out", str(tmp_path / "metrics.json")]
    assert evaluate_main(argv) == 0
    assert loaded == [("INCEPTION_DIR", {"preprocessing": "tf_graph"})]
    out = capsys.readouterr().out
    for label in ("Inception Score: ", "FID: ", "sFID: ", "Precision: ", "Recall: "):
        assert label in out, out
    report = json.loads((tmp_path / "metrics.json").read_text())
    expected = metrics.evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", _fake_features)
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, rel=1e-5), key
    assert report["preprocessing"] == "tf_graph" and report["num_samples"] == 20


def test_both_inputs_are_checked_before_any_image_reaches_the_inception(tmp_path):
    _write_images(tmp_path / "samples.npz", 12, 0)
    _write_images(tmp_path / "ref.npz", 12, 1)
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((12, 8, 8, 3), np.float32))
    _write_images(tmp_path / "few.npz", 9, 2)
    _write_images(tmp_path / "half_stats.npz", 12, 3, mu=np.zeros(16))
    np.save(tmp_path / "array.npy", np.zeros((12, 8, 8, 3), np.uint8))
    (tmp_path / "array.npy").rename(tmp_path / "renamed.npz")
    calls = []

    def spy(batch):
        calls.append(len(batch))
        return _fake_features(batch)

    cases = [
        ("floats.npz", "ref.npz", "floats.npz:arr_0 is float32 (12, 8, 8, 3); expected uint8"),
        ("few.npz", "ref.npz", "few.npz:arr_0 holds 9 images; the metrics (10 Inception Score "
                               "splits) need at least 10"),
        ("renamed.npz", "ref.npz", "renamed.npz is not an .npz archive"),
        ("samples.npz", "half_stats.npz", "has ['mu'] but lacks ['sigma', 'mu_s', 'sigma_s']"),
        ("samples.npz", "floats.npz", "floats.npz:arr_0 is float32"),
    ]
    for samples, ref, message in cases:
        with pytest.raises(ValueError) as err:
            metrics.evaluate(tmp_path / samples, tmp_path / ref, spy, batch_size=4)
        assert message in str(err.value), (samples, ref, str(err.value))
        assert calls == [], (samples, ref)  # not a single batch went through the network


def test_metrics_cli_checks_its_inputs_before_loading_the_inception(tmp_path, capsys,
                                                                     monkeypatch):
    from hmar_jax.evaluate import inception

    loaded = []
    monkeypatch.setattr(inception, "load_inception",
                        lambda directory, **kw: loaded.append(directory) or pytest.fail("loaded"))
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((12, 8, 8, 3), np.float32))
    _write_images(tmp_path / "ref.npz", 12, 1)
    _write_images(tmp_path / "samples.npz", 12, 0)
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "ref.npz").read_bytes()[:500])
    for samples, ref, message in [("floats.npz", "ref.npz", "expected uint8 images"),
                                  ("samples.npz", "truncated.npz", "is not an .npz archive")]:
        code = evaluate_main(["metrics", "--samples", str(tmp_path / samples),
                              "--ref", str(tmp_path / ref), "--inception", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err
    assert loaded == []
