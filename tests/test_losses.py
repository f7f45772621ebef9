"""Losses, stage-2 mask sampling and label dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmar_jax.training import losses
from hmar_jax.scales import ScaleLayout

LAYOUT = ScaleLayout.create((1, 2, 3, 4))  # L = 30


def test_cross_entropy_matches_numpy():
    logits = jax.random.normal(jax.random.key(0), (2, 30, 7))
    targets = jax.random.randint(jax.random.key(1), (2, 30), 0, 7)
    log_probs = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(losses.token_cross_entropy(logits, targets)), expected,
                               rtol=1e-5)


@pytest.mark.parametrize("weighting", ["uniform", "lognorm", "equal"])
def test_scale_weighted_loss_and_per_scale_metrics(weighting):
    logits = jax.random.normal(jax.random.key(0), (3, 30, 11))
    targets = jax.random.randint(jax.random.key(1), (3, 30), 0, 11)
    weights = jnp.asarray(LAYOUT.token_loss_weights(weighting))
    loss, metrics = losses.scale_weighted_cross_entropy(logits, targets, weights, LAYOUT)
    ce = np.asarray(losses.token_cross_entropy(logits, targets))
    assert float(loss) == pytest.approx(float(np.mean((ce * np.asarray(weights)).sum(-1))), rel=1e-6)
    per_scale = [ce[:, LAYOUT.token_slice(k)].mean() for k in range(4)]
    np.testing.assert_allclose(np.asarray(metrics["ce_per_scale"]), per_scale, rtol=1e-5)
    correct = np.asarray(jnp.argmax(logits, -1) == targets)
    np.testing.assert_allclose(np.asarray(metrics["accuracy_per_scale"]),
                               [correct[:, LAYOUT.token_slice(k)].mean() for k in range(4)], rtol=1e-6)
    assert float(metrics["ce"]) == pytest.approx(float(ce.mean()), rel=1e-6)


def test_masked_loss_uses_only_masked_positions():
    logits = jax.random.normal(jax.random.key(0), (2, 30, 5))
    targets = jax.random.randint(jax.random.key(1), (2, 30), 0, 5)
    masked = np.zeros((1, 29), bool)
    masked[0, [0, 4, 20]] = True  # rows -> tokens 1, 5, 21
    loss, metrics = losses.masked_cross_entropy(logits, targets, jnp.asarray(masked))
    ce = np.asarray(losses.token_cross_entropy(logits, targets))
    assert float(loss) == pytest.approx(float(ce[:, [1, 5, 21]].mean()), rel=1e-6)
    assert float(metrics["masked_tokens"]) == 3
    # Changing logits at unmasked positions does not change the loss.
    other = logits.at[:, 2].add(5.0)
    assert float(losses.masked_cross_entropy(other, targets, jnp.asarray(masked))[0]) == pytest.approx(
        float(loss), rel=1e-6)


def test_stage2_mask_counts_follow_ceil_ratio():
    layout = ScaleLayout.create(256)
    for ratio in (0.0, 0.01, 0.5, 0.999):
        masked = np.asarray(losses.sample_stage2_mask(jax.random.key(3), layout, jnp.asarray(ratio)))
        assert masked.shape == (679,)
        for k in range(1, 10):
            assert masked[layout.input_slice(k)].sum() == np.ceil(np.float32(ratio) * layout.tokens_per_scale[k])
    draws = [np.asarray(losses.sample_stage2_mask(jax.random.key(s), layout)) for s in range(40)]
    fractions = [d[layout.input_slice(9)].mean() for d in draws]
    assert 0.35 < np.mean(fractions) < 0.65 and np.std(fractions) > 0.15  # ratio ~ U[0, 1)
    assert all(d[layout.input_slice(1)].sum() >= 1 for d in draws)  # ceil: >= 1 whenever ratio > 0
    positions = np.stack([d[layout.input_slice(9)] for d in draws])
    assert positions.mean(0).std() < 0.2  # every position gets masked sometimes


def test_label_dropout_rate_and_null_class():
    labels = jnp.arange(10000) % 10
    dropped = np.asarray(losses.drop_labels(jax.random.key(0), labels, 0.1, null_class=10))
    changed = dropped != np.asarray(labels)
    assert 0.08 < changed.mean() < 0.12 and np.all(dropped[changed] == 10)
    np.testing.assert_array_equal(losses.drop_labels(jax.random.key(0), labels, 0.0, 10), labels)
