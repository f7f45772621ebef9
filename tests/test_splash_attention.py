"""Splash attention (``hmar_jax.pallas.splash``, the TPU attention) in Pallas interpret mode
on CPU, against the plain-jnp reference.

The output, the log-sum-exp and the three gradients are compared with ``reference_attention``
(and its ``jax.vjp``) evaluated in float32 on the same, possibly bf16, inputs, for both scale
masks at both released scale lists (L = 680 and 2240, padded to splash's tiles), and for the
unmasked pattern with unequal, padded query and key lengths. Errors are relative to the
largest reference value: float32 1e-5 (the kernels and the reference differ only in
summation order; the largest measured is 4e-6), bfloat16 2e-2 (splash rounds the softmax
weights and the output to bf16, each 2^-9 relative, and the gradients through bf16 do and
weights; the largest measured is 5e-3).
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmar_jax.pallas import ops, splash
from hmar_jax.pallas.reference import hmar_qkv, reference_attention
from hmar_jax.scales import PATCH_NUMS, ScaleLayout

TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _inputs(seed_key, shape_q, shape_k, dtype):
    """q, k, v ~ N(0, 1) and a cotangent, seeded by the parametrisation."""
    key = jax.random.key(zlib.crc32(repr(seed_key).encode()))
    kq, kk, kv, kd = jax.random.split(key, 4)
    shapes = (shape_q, shape_k, shape_k, shape_q)
    return tuple(jax.random.normal(r, s, jnp.float32).astype(dtype)
                 for r, s in zip((kq, kk, kv, kd), shapes))


def _reference(q, k, v, do, mask, sm_scale):
    """float32 o [B, Lq, N, K], lse [B, N, Lq] and (dq, dk, dv) of the dense-mask oracle."""
    q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
    o, vjp = jax.vjp(lambda a, b, c: reference_attention(a, b, c, mask, sm_scale=sm_scale),
                     q, k, v)
    logits = jnp.einsum("bqnk,bsnk->bnqs", q, k) * sm_scale
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return o, jax.nn.logsumexp(logits, axis=-1), vjp(do)


def _assert_close(name, actual, expected, tol):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{name} has non-finite values"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6)
    assert err <= tol, f"{name}: relative max error {err:.2e} > {tol:.0e}"


def _check(q, k, v, do, *, pattern, patch_nums, mask, sm_scale):
    kwargs = dict(pattern=pattern, patch_nums=patch_nums, sm_scale=sm_scale, interpret=True)

    @jax.jit
    def run(q, k, v, do):  # one program: compiling interpret-mode kernels dominates the time
        out, vjp = jax.vjp(functools.partial(splash.attention, **kwargs), q, k, v)
        return splash.attention_and_lse(q, k, v, **kwargs), out, vjp(do)

    (o, lse), out, (dq, dk, dv) = run(q, k, v, do)
    assert o.dtype == out.dtype == q.dtype and lse.dtype == jnp.float32
    assert (dq.dtype, dk.dtype, dv.dtype) == (q.dtype,) * 3
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(out, np.float32))
    ref_o, ref_lse, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, do, mask, sm_scale)
    tol = TOL[jnp.dtype(q.dtype).name]
    for name, actual, expected in (("o", o, ref_o), ("lse", lse, ref_lse), ("dq", dq, ref_dq),
                                   ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        _assert_close(name, actual, expected, tol)


# pattern, resolution, dtype, B, sm_scale: the whole matrix; the fast tier keeps one case of
# each mask and dtype at 256 px (each case compiles interpret-mode kernels for 5-20 s)
SCALE_CASES = [
    ("block_diagonal", 256, "float32", 2, 0.25),
    ("block_causal", 256, "bfloat16", 1, 1.0),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("block_diagonal", 256, "bfloat16", 1, 1.0),
        ("block_causal", 256, "float32", 2, 0.25),
        ("block_diagonal", 512, "float32", 1, 1.0),
        ("block_causal", 512, "float32", 1, 0.25),
        ("block_diagonal", 512, "bfloat16", 1, 0.25),
        ("block_causal", 512, "bfloat16", 1, 1.0),
    ]),
]


@pytest.mark.parametrize("pattern, resolution, dtype, batch, sm_scale", SCALE_CASES)
def test_masked_patterns_match_reference(pattern, resolution, dtype, batch, sm_scale):
    layout = ScaleLayout(PATCH_NUMS[resolution])
    shape = (batch, layout.seq_len, 2, 64)
    q, k, v, do = _inputs((pattern, resolution, dtype), shape, shape, dtype)
    _check(q, k, v, do, pattern=pattern, patch_nums=layout.patch_nums,
           mask=jnp.asarray(layout.attention_mask(pattern)), sm_scale=sm_scale)


@pytest.mark.parametrize("len_q, len_k", [(100, 128), pytest.param(40, 200, marks=pytest.mark.slow)])
def test_unmasked_rectangular_matches_reference(len_q, len_k):
    """``full`` with Lq != Lk (a scale against a KV cache): both lengths padded, or only the
    queries (the padded queries then attend every key)."""
    q, k, v, do = _inputs(("full", len_q, len_k), (1, len_q, 2, 64), (1, len_k, 2, 64),
                          "float32")
    _check(q, k, v, do, pattern="full", patch_nums=(), mask=None, sm_scale=0.5)


@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal", "full"])
@pytest.mark.parametrize("resolution", [16, 256, 512])
def test_padded_mask(pattern, resolution):
    """The tiles and padding: real rows keep exactly the pattern's keys, padded rows are
    never empty, and the padded length is the next multiple of the tile."""
    patch_nums = (1, 2, 3, 4, 6) if resolution == 16 else PATCH_NUMS[resolution]
    length = ScaleLayout(patch_nums).seq_len
    mask = splash.padded_mask(pattern, patch_nums, length, length)
    block = splash.block_size(length)
    assert block == {16: 128, 256: 256, 512: 256}[resolution]
    assert mask.shape == ((-(-length // block) * block),) * 2
    want = (np.ones((length, length), bool) if pattern == "full"
            else ScaleLayout(patch_nums).attention_mask(pattern))
    np.testing.assert_array_equal(mask[:length, :length], want)
    assert not mask[:length, length:].any()
    assert mask.any(axis=1).all()


def test_ops_tpu_implementation_runs_splash(monkeypatch):
    """``AttentionSpec(implementation="tpu")``: ``ops.attention`` and the model's packed
    ``hmar_attention`` run splash (here in interpret mode) and match the reference, values
    and gradients; unmasked calls with at most ``SMALL_FULL_KEYS`` keys take the
    reference."""
    calls, compiled = [], splash.attention

    def interpreted(q, k, v, **kwargs):
        calls.append((kwargs["pattern"], q.shape[1], k.shape[1]))
        return compiled(q, k, v, **kwargs, interpret=True)

    monkeypatch.setattr(splash, "attention", interpreted)
    patch_nums = (1, 2, 3, 4, 6)
    layout = ScaleLayout(patch_nums)
    length = layout.seq_len
    qkv = jax.random.normal(jax.random.key(0), (2, length, 3, 2, 32))
    bias = 0.1 * jax.random.normal(jax.random.key(1), (3, 2, 32))
    temperature = jnp.asarray([4.0, 20.0])
    w = jax.random.normal(jax.random.key(2), (2, length, 2, 32))

    def loss(spec, qkv, bias, temperature):
        return jnp.sum(ops.hmar_attention(qkv, bias, temperature, spec) * w)

    loss_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    attention = jax.jit(ops.attention, static_argnums=3, static_argnames="sm_scale")
    tpu = ops.AttentionSpec("block_causal", patch_nums, "tpu")
    xla = ops.AttentionSpec("block_causal", patch_nums, "xla")
    for actual, expected in zip(jax.tree.leaves(loss_and_grads(tpu, qkv, bias, temperature)),
                                jax.tree.leaves(loss_and_grads(xla, qkv, bias, temperature))):
        _assert_close("hmar_attention", actual, expected, TOL["float32"])
    q, k, v = hmar_qkv(qkv, bias, temperature)
    _assert_close("attention", attention(q, k, v, tpu, sm_scale=0.5),
                  attention(q, k, v, xla, sm_scale=0.5), TOL["float32"])
    small, large = ops.SMALL_FULL_KEYS, ops.SMALL_FULL_KEYS + 16
    for len_k in (small, large):
        q, k, v, _ = _inputs(("ops-full", len_k), (1, 16, 2, 32), (1, len_k, 2, 32), "float32")
        out = attention(q, k, v, ops.AttentionSpec("full", (), "tpu"))
        _assert_close("full", out, reference_attention(q, k, v), TOL["float32"])
    assert calls == [("block_causal", length, length)] * 2 + [("full", 16, large)]

