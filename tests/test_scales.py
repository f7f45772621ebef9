"""Scale bookkeeping: sequence lengths, offsets, phi, masks and loss weights."""

import numpy as np
import pytest

from hmar_jax import scales
from hmar_jax.scales import ScaleLayout


@pytest.mark.parametrize("resolution, length, num_scales", [(256, 680, 10), (512, 2240, 10),
                                                            (1024, 9451, 14)])
def test_sequence_lengths(resolution, length, num_scales):
    layout = ScaleLayout.create(resolution)
    assert layout.seq_len == length
    assert layout.num_scales == num_scales
    assert layout.latent_side == resolution // 16
    assert layout.starts[-1] == length and layout.level_ids.shape == (length,)


def test_offsets_and_slices_256():
    layout = ScaleLayout.create("256")
    np.testing.assert_array_equal(layout.starts,
                                  [0, 1, 5, 14, 30, 55, 91, 155, 255, 424, 680])
    assert layout.token_slice(9) == slice(424, 680)
    assert layout.input_slice(1) == slice(0, 4)
    assert layout.input_slice(9) == slice(423, 679)
    with pytest.raises(ValueError, match="Scale 0"):
        layout.input_slice(0)
    np.testing.assert_array_equal(np.bincount(layout.level_ids), layout.tokens_per_scale)


def test_phi_tables_are_the_checkpoint_ones():
    assert ScaleLayout.create(256).phi == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert ScaleLayout.create(512).phi == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert ScaleLayout.create(1024).phi == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
    # The hard-coded table is what float64 gives; float32 breaks the tie at scale 7.
    ticks32 = np.linspace(1 / 12, 11 / 12, 4).astype(np.float32)
    pos32 = (np.arange(10) / 9).astype(np.float32)
    assert int(np.argmin(np.abs(ticks32 - pos32[7]))) == 2
    assert scales.phi_indices(6, 4) == (0, 0, 1, 2, 3, 3)  # nearest of ticks 1/12..11/12
    assert scales.phi_indices(5, 0) == (0, 1, 2, 3, 4)
    assert scales.phi_indices(5, 1) == (0,) * 5


@pytest.mark.parametrize("kind, density", [("block_diagonal", 0.239), ("block_causal", 0.619)])
def test_masks_and_key_ranges_agree(kind, density):
    layout = ScaleLayout.create(256)
    mask = layout.attention_mask(kind)
    assert mask.shape == (680, 680)
    assert mask.mean() == pytest.approx(density, abs=1e-3)
    start, end = layout.key_ranges(kind)
    j = np.arange(680)[None, :]
    np.testing.assert_array_equal(mask, (j >= start[:, None]) & (j < end[:, None]))
    col_start, col_end = layout.query_ranges(kind)
    i = np.arange(680)[:, None]
    np.testing.assert_array_equal(mask, (i >= col_start[None, :]) & (i < col_end[None, :]))
    assert mask[100, 91] and not mask[100, 90] == (kind == "block_diagonal")


def test_block_diagonal_is_inside_block_causal():
    layout = ScaleLayout.create((1, 2, 3))
    diag, causal = layout.attention_mask("block_diagonal"), layout.attention_mask("block_causal")
    assert np.all(causal[diag]) and causal.sum() > diag.sum()
    assert np.array_equal(causal, np.tril(causal) | diag)


def test_lognorm_weights_match_the_spec_tables():
    layout = ScaleLayout.create(256)
    expected = [0.02468, 0.06416, 0.11495, 0.13790, 0.14020, 0.13286, 0.12080, 0.10539,
                0.08822, 0.07085]
    np.testing.assert_allclose(layout.scale_weights("lognorm"), expected, atol=6e-6)
    weights = layout.token_loss_weights("lognorm")
    assert weights.dtype == np.float32 and weights.shape == (680,)
    assert weights.sum() == pytest.approx(1.0, abs=1e-6)
    assert weights[0] == pytest.approx(2.468e-02, rel=1e-3)
    assert weights[-1] == pytest.approx(2.768e-04, rel=1e-3)
    expected512 = [0.01955, 0.06671, 0.11412, 0.13887, 0.13786, 0.12457, 0.11123, 0.10368,
                   0.09576, 0.08765]
    np.testing.assert_allclose(ScaleLayout.create(512).scale_weights("lognorm"), expected512,
                               atol=6e-6)


def test_uniform_and_equal_weights():
    layout = ScaleLayout.create(256)
    np.testing.assert_allclose(layout.token_loss_weights("uniform"), 1 / 680, rtol=1e-6)
    equal = layout.token_loss_weights("equal")
    assert equal.sum() == pytest.approx(10.0, rel=1e-6)
    assert equal[-1] == pytest.approx(1 / 256)
    with pytest.raises(ValueError, match="Unknown loss weighting"):
        layout.token_loss_weights("cosine")


def test_split_tokens_is_row_major():
    layout = ScaleLayout.create((1, 2, 3))
    tokens = np.arange(2 * 14).reshape(2, 14)
    parts = layout.split_tokens(tokens)
    assert [p.shape for p in parts] == [(2, 1, 1), (2, 2, 2), (2, 3, 3)]
    np.testing.assert_array_equal(parts[2][1], [[19, 20, 21], [22, 23, 24], [25, 26, 27]])


@pytest.mark.parametrize("bad", ["300", "1,3,2", (0, 1), "", 7])
def test_bad_patch_nums(bad):
    with pytest.raises(ValueError, match="patch_nums"):
        scales.resolve_patch_nums(bad)
