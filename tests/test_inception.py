"""FID Inception: conversion from a synthetic PyTorch-layout state_dict, parity of the whole
network with an independent float64 NumPy forward, output shapes, and error messages."""

import jax
import numpy as np
import pytest
from flax import nnx
from threadpoolctl import threadpool_limits

from hmar_jax.convert import inception as inception_convert
from hmar_jax.convert import torch_pickle
from hmar_jax.convert.__main__ import main as convert_main
from hmar_jax.evaluate import inception

# ----------------------------------------------------------------------------- architecture
# Written out here from torchvision's Inception-v3 with pytorch-fid's FID blocks, independently
# of the module under test: {prefix: (in, out, kh, kw, stride, pad_h, pad_w)}.


def _block_a(name, cin, pool):
    return {f"{name}.branch1x1": (cin, 64, 1, 1, 1, 0, 0),
            f"{name}.branch5x5_1": (cin, 48, 1, 1, 1, 0, 0),
            f"{name}.branch5x5_2": (48, 64, 5, 5, 1, 2, 2),
            f"{name}.branch3x3dbl_1": (cin, 64, 1, 1, 1, 0, 0),
            f"{name}.branch3x3dbl_2": (64, 96, 3, 3, 1, 1, 1),
            f"{name}.branch3x3dbl_3": (96, 96, 3, 3, 1, 1, 1),
            f"{name}.branch_pool": (cin, pool, 1, 1, 1, 0, 0)}


def _block_c(name, c7):
    return {f"{name}.branch1x1": (768, 192, 1, 1, 1, 0, 0),
            f"{name}.branch7x7_1": (768, c7, 1, 1, 1, 0, 0),
            f"{name}.branch7x7_2": (c7, c7, 1, 7, 1, 0, 3),
            f"{name}.branch7x7_3": (c7, 192, 7, 1, 1, 3, 0),
            f"{name}.branch7x7dbl_1": (768, c7, 1, 1, 1, 0, 0),
            f"{name}.branch7x7dbl_2": (c7, c7, 7, 1, 1, 3, 0),
            f"{name}.branch7x7dbl_3": (c7, c7, 1, 7, 1, 0, 3),
            f"{name}.branch7x7dbl_4": (c7, c7, 7, 1, 1, 3, 0),
            f"{name}.branch7x7dbl_5": (c7, 192, 1, 7, 1, 0, 3),
            f"{name}.branch_pool": (768, 192, 1, 1, 1, 0, 0)}


def _block_e(name, cin):
    return {f"{name}.branch1x1": (cin, 320, 1, 1, 1, 0, 0),
            f"{name}.branch3x3_1": (cin, 384, 1, 1, 1, 0, 0),
            f"{name}.branch3x3_2a": (384, 384, 1, 3, 1, 0, 1),
            f"{name}.branch3x3_2b": (384, 384, 3, 1, 1, 1, 0),
            f"{name}.branch3x3dbl_1": (cin, 448, 1, 1, 1, 0, 0),
            f"{name}.branch3x3dbl_2": (448, 384, 3, 3, 1, 1, 1),
            f"{name}.branch3x3dbl_3a": (384, 384, 1, 3, 1, 0, 1),
            f"{name}.branch3x3dbl_3b": (384, 384, 3, 1, 1, 1, 0),
            f"{name}.branch_pool": (cin, 192, 1, 1, 1, 0, 0)}


CONVS = {
    "Conv2d_1a_3x3": (3, 32, 3, 3, 2, 0, 0), "Conv2d_2a_3x3": (32, 32, 3, 3, 1, 0, 0),
    "Conv2d_2b_3x3": (32, 64, 3, 3, 1, 1, 1), "Conv2d_3b_1x1": (64, 80, 1, 1, 1, 0, 0),
    "Conv2d_4a_3x3": (80, 192, 3, 3, 1, 0, 0),
    **_block_a("Mixed_5b", 192, 32), **_block_a("Mixed_5c", 256, 64),
    **_block_a("Mixed_5d", 288, 64),
    "Mixed_6a.branch3x3": (288, 384, 3, 3, 2, 0, 0),
    "Mixed_6a.branch3x3dbl_1": (288, 64, 1, 1, 1, 0, 0),
    "Mixed_6a.branch3x3dbl_2": (64, 96, 3, 3, 1, 1, 1),
    "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3, 2, 0, 0),
    **_block_c("Mixed_6b", 128), **_block_c("Mixed_6c", 160), **_block_c("Mixed_6d", 160),
    **_block_c("Mixed_6e", 192),
    "Mixed_7a.branch3x3_1": (768, 192, 1, 1, 1, 0, 0),
    "Mixed_7a.branch3x3_2": (192, 320, 3, 3, 2, 0, 0),
    "Mixed_7a.branch7x7x3_1": (768, 192, 1, 1, 1, 0, 0),
    "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7, 1, 0, 3),
    "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1, 1, 3, 0),
    "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3, 2, 0, 0),
    **_block_e("Mixed_7b", 1280), **_block_e("Mixed_7c", 2048),
}


def synthetic_state_dict(seed=0):
    """Random tensors for every key, in the PyTorch layout, scaled to keep activations O(1)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for prefix, (cin, cout, kh, kw, *_) in CONVS.items():
        fan_in = cin * kh * kw
        sd[f"{prefix}.conv.weight"] = (rng.standard_normal((cout, cin, kh, kw))
                                       * np.sqrt(2.0 / fan_in)).astype(np.float32)
        sd[f"{prefix}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        sd[f"{prefix}.bn.bias"] = rng.uniform(-0.2, 0.4, cout).astype(np.float32)
        sd[f"{prefix}.bn.running_mean"] = rng.normal(0, 0.2, cout).astype(np.float32)
        sd[f"{prefix}.bn.running_var"] = rng.uniform(0.5, 2.0, cout).astype(np.float32)
        sd[f"{prefix}.bn.num_batches_tracked"] = np.array(0, np.int64)  # as torch.save writes
    sd["fc.weight"] = (rng.standard_normal((1008, 2048)) / np.sqrt(2048)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.1, 1008).astype(np.float32)
    return sd


# ----------------------------------------------------------------------------- NumPy reference
# NCHW, float64, the TF-graph preprocessing; deliberately plain loops over kernel taps.


def ref_resize_tf(images, size):
    """Legacy TF1 ResizeBilinear (align_corners=False, no half-pixel centres), NHWC in."""
    n, h, w, c = images.shape
    x = images.astype(np.float64)

    def coords(in_size):
        src = np.arange(size, dtype=np.float32) * (np.float32(in_size) / np.float32(size))
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, in_size - 1), (src - lo).astype(np.float64)

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    wx, wy = fx[None, None, :, None], fy[None, :, None, None]
    top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
    bottom = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


def ref_conv_bn_relu(x, sd, prefix):
    _, _, kh, kw, stride, ph, pw = CONVS[prefix]
    w = sd[f"{prefix}.conv.weight"].astype(np.float64)
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out += np.tensordot(w[:, :, i, j], patch, axes=([1], [1])).transpose(1, 0, 2, 3)
    bn = {k: sd[f"{prefix}.bn.{k}"].astype(np.float64)[None, :, None, None]
          for k in ("weight", "bias", "running_mean", "running_var")}
    out = (out - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3)
    return np.maximum(out * bn["weight"] + bn["bias"], 0)


def ref_pool(x, kind, size, stride, pad):
    n, c, h, w = x.shape
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    ones = np.pad(np.ones((h, w)), pad)
    ho, wo = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
    acc = np.full((n, c, ho, wo), fill)
    count = np.zeros((ho, wo))
    for i in range(size):
        for j in range(size):
            rows = slice(i, i + stride * (ho - 1) + 1, stride)
            cols = slice(j, j + stride * (wo - 1) + 1, stride)
            window = xp[:, :, rows, cols]
            acc = np.maximum(acc, window) if kind == "max" else acc + window
            count += ones[rows, cols]
    return acc if kind == "max" else acc / count  # average over valid pixels only


def ref_forward(images, sd, size):
    def conv(x, prefix):
        return ref_conv_bn_relu(x, sd, prefix)

    def chain(x, name, *branches):
        for branch in branches:
            x = conv(x, f"{name}.{branch}")
        return x

    x = (ref_resize_tf(images, size) - 128.0) / 128.0
    x = x.transpose(0, 3, 1, 2)  # NCHW
    for prefix in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = conv(x, prefix)
    x = ref_pool(x, "max", 3, 2, 0)
    x = ref_pool(conv(conv(x, "Conv2d_3b_1x1"), "Conv2d_4a_3x3"), "max", 3, 2, 0)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = np.concatenate([
            chain(x, name, "branch1x1"), chain(x, name, "branch5x5_1", "branch5x5_2"),
            chain(x, name, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
            conv(ref_pool(x, "avg", 3, 1, 1), f"{name}.branch_pool")], axis=1)
    x = np.concatenate([
        chain(x, "Mixed_6a", "branch3x3"),
        chain(x, "Mixed_6a", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
        ref_pool(x, "max", 3, 2, 0)], axis=1)
    spatial = None
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        branch1x1 = chain(x, name, "branch1x1")
        if name == "Mixed_6d":  # TF mixed_6/conv: the 1x1 branch after BN and ReLU
            spatial = branch1x1[:, :7].transpose(0, 2, 3, 1).reshape(len(x), -1)  # (h, w, c)
        x = np.concatenate([
            branch1x1, chain(x, name, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
            chain(x, name, *[f"branch7x7dbl_{i}" for i in range(1, 6)]),
            conv(ref_pool(x, "avg", 3, 1, 1), f"{name}.branch_pool")], axis=1)
    x = np.concatenate([
        chain(x, "Mixed_7a", "branch3x3_1", "branch3x3_2"),
        chain(x, "Mixed_7a", *[f"branch7x7x3_{i}" for i in range(1, 5)]),
        ref_pool(x, "max", 3, 2, 0)], axis=1)
    for name, pool in (("Mixed_7b", "avg"), ("Mixed_7c", "max")):
        b3 = chain(x, name, "branch3x3_1")
        bd = chain(x, name, "branch3x3dbl_1", "branch3x3dbl_2")
        x = np.concatenate([
            chain(x, name, "branch1x1"),
            conv(b3, f"{name}.branch3x3_2a"), conv(b3, f"{name}.branch3x3_2b"),
            conv(bd, f"{name}.branch3x3dbl_3a"), conv(bd, f"{name}.branch3x3dbl_3b"),
            conv(ref_pool(x, pool, 3, 1, 1), f"{name}.branch_pool")], axis=1)
    pool3 = x.mean(axis=(2, 3))
    return {"pool": pool3, "spatial": spatial,
            "logits": pool3 @ sd["fc.weight"].astype(np.float64).T}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def state_dict():
    return synthetic_state_dict()


@pytest.fixture(scope="module")
def export(tmp_path_factory, state_dict):
    """The synthetic weights written as a .pth and converted through the real CLI."""
    tmp = tmp_path_factory.mktemp("inception")
    src = tmp / inception.WEIGHTS_FILE
    torch_pickle.save_state_dict(src, state_dict)
    assert convert_main(["inception", "--src", str(src), "--out", str(tmp / "export")]) == 0
    return tmp / "export"


# ----------------------------------------------------------------------------- tests


def test_whole_network_matches_numpy_reference_at_299(export, state_dict):
    images = np.random.default_rng(1).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    model = inception.load_inception(export)
    graphdef, params = nnx.split(model)
    got = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, images)
    with threadpool_limits(limits=1, user_api="blas"):
        want = ref_forward(images, state_dict, 299)
    assert got["pool"].shape == (1, 2048) and got["spatial"].shape == (1, 7 * 17 * 17)
    assert got["logits"].shape == (1, 1008)
    for key in ("pool", "spatial", "logits"):
        scale = np.abs(want[key]).max()
        assert scale > 1e-2, key  # the random network must not have died out
        np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=0, atol=2e-5 * scale,
                                   err_msg=key)


def test_output_shapes_for_small_resize_and_batches():
    abstract = nnx.eval_shape(lambda: inception.InceptionV3(image_size=139, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    out = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params,
                         jax.ShapeDtypeStruct((2, 32, 48, 3), np.uint8))
    side = inception.spatial_side(139)
    assert side == 7 and inception.spatial_side(299) == 17
    assert {k: v.shape for k, v in out.items()} == {
        "pool": (2, 2048), "spatial": (2, 7 * side * side), "logits": (2, 1008)}
    assert all(v.dtype == np.float32 for v in out.values())


def test_resize_matrices_follow_tensorflow_and_pytorch_conventions():
    tf = inception.bilinear_resize_matrix(3, 6, "tf_graph")
    x = np.array([0.0, 10.0, 40.0])
    # TF1 legacy: src = dst * in/out -> 0, .5, 1, 1.5, 2, 2.5 (clamped at the last pixel).
    np.testing.assert_allclose(tf @ x, [0, 5, 10, 25, 40, 40])
    pt = inception.bilinear_resize_matrix(3, 6, "pytorch_fid")
    # Half-pixel: src = (dst + .5) / 2 - .5 -> -.25 (clamped to 0), .25, .75, 1.25, 1.75, 2.25.
    np.testing.assert_allclose(pt @ x, [0, 2.5, 7.5, 17.5, 32.5, 40])
    np.testing.assert_allclose(inception.bilinear_resize_matrix(5, 5, "tf_graph"), np.eye(5))
    np.testing.assert_allclose(inception.bilinear_resize_matrix(5, 5, "pytorch_fid"), np.eye(5))


def test_preprocess_matches_reference_resize_and_normalisation():
    images = np.random.default_rng(2).integers(0, 256, (2, 20, 33, 3), dtype=np.uint8)
    got = np.asarray(inception.preprocess(images, 29, "tf_graph"))
    np.testing.assert_allclose(got, (ref_resize_tf(images, 29) - 128) / 128, atol=1e-5)
    fixed = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=-1)
    fixed = np.broadcast_to(fixed, (1, 3, 3, 3))
    tf_row = np.asarray(inception.preprocess(fixed, 3, "tf_graph"))[0, 0, :, 0]
    np.testing.assert_allclose(tf_row, [-1, 0, 127 / 128])
    pt_row = np.asarray(inception.preprocess(fixed, 3, "pytorch_fid"))[0, 0, :, 0]
    np.testing.assert_allclose(pt_row, [-1, 128 / 127.5 - 1, 1], atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \[N, H, W, 3\]"):
        inception.preprocess(np.zeros((2, 8, 8), np.uint8))


def test_converter_validates_every_key(state_dict):
    params = inception_convert.convert_state_dict(state_dict)
    kernel = state_dict["Mixed_6d.branch1x1.conv.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
    np.testing.assert_array_equal(params["Mixed_6d"]["branch1x1"]["conv"]["kernel"], kernel)
    np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
    cases = [
        ({k: v for k, v in state_dict.items() if k != "Mixed_6d.branch1x1.bn.running_var"},
         "missing key 'Mixed_6d.branch1x1.bn.running_var'"),
        (dict(state_dict, **{"Mixed_7c.branch_pool.conv.weight": np.zeros((192, 2048, 3, 3))}),
         "key 'Mixed_7c.branch_pool.conv.weight' has shape (192, 2048, 3, 3), expected "
         "(192, 2048, 1, 1)"),
        (dict(state_dict, **{"Mixed_5b.extra.weight": np.zeros(1)}),
         "unexpected key 'Mixed_5b.extra.weight'"),
        (dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768))}),
         "torchvision's ImageNet Inception-v3"),
        ({"weight": np.zeros(3)}, "Not an Inception-v3 state_dict"),
    ]
    for bad, message in cases:
        with pytest.raises(inception_convert.ConversionError) as err:
            inception_convert.convert_state_dict(bad)
        assert message in str(err.value), str(err.value)


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    missing = tmp_path / inception.WEIGHTS_FILE
    assert convert_main(["inception", "--src", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert inception.WEIGHTS_FILE in err and "pytorch-fid" in err and inception.WEIGHTS_URL in err
    foreign = tmp_path / "torchvision.pth"
    torch_pickle.save_state_dict(foreign, {"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3)),
                                           "fc.weight": np.zeros((1000, 2048), np.float32)})
    assert convert_main(["inception", "--src", str(foreign), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the FID Inception" in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="python -m hmar_jax.convert inception"):
        inception.load_inception(tmp_path)
