"""`python -m hmar_jax.convert hmar|var|assemble`: validation, error messages, assembly."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import checkpointing
from hmar_jax.convert import hmar as hmar_convert
from hmar_jax.convert import torch_pickle
from hmar_jax.convert.__main__ import main as convert_main
from hmar_jax.transformer import HMARTransformer, preset


@pytest.fixture(scope="module")
def hmar_sd(hmar_fixture):
    return {k[3:]: v for k, v in hmar_fixture.items() if k.startswith("sd/")}


@pytest.fixture(scope="module")
def var_sd(hmar_fixture, hmar_sd):
    key_map = json.loads(str(hmar_fixture["config"]))["nsp_key_to_hmar_key"]
    return {var_key: hmar_sd[hmar_key] for var_key, hmar_key in key_map.items()}


def run(tmp_path, kind, state_dict, name="model.pth", extra=()):
    src = tmp_path / name
    torch_pickle.save_state_dict(src, state_dict)
    return convert_main([kind, "--src", str(src), "--out", str(tmp_path / "out"), *extra])


def fails_with(tmp_path, capsys, pattern, *args, **kwargs):
    assert run(tmp_path, *args, **kwargs) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and pattern in message, message
    assert not (tmp_path / "out").exists()
    return message


def test_hmar_metadata_and_buffers_dropped(tmp_path, hmar_sd):
    assert run(tmp_path, "hmar", hmar_sd, name="hmar-d2.pth") == 0
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["source_format"] == "hmar"
    params = nnx.to_pure_dict(nnx.state(checkpointing.load_hmar(tmp_path / "out"), nnx.Param))
    assert "lvl_1L" not in params and "attn_bias_for_masking" not in params
    np.testing.assert_array_equal(params["blocks"]["attn"]["mat_qkv"]["kernel"][1],
                                  hmar_sd["ns_blocks.0.attn.mat_qkv.weight"].T)
    np.testing.assert_array_equal(params["mask_blocks"]["ffn"]["fc2"]["bias"][0],
                                  hmar_sd["mask_blocks.0.ffn.fc2.bias"])


def test_wrong_depth_from_flag_and_from_file_name(tmp_path, hmar_sd, capsys):
    fails_with(tmp_path, capsys, "--depth says depth 16, but the file holds a depth-2 model "
               "(1 base + 1 ns blocks)", "hmar", hmar_sd, extra=["--depth", "16"])
    fails_with(tmp_path, capsys, "The file name 'hmar-d16.pth' says depth 16", "hmar", hmar_sd,
               name="hmar-d16.pth")


def test_var_file_as_hmar_and_hmar_file_as_var(tmp_path, hmar_sd, var_sd, capsys):
    fails_with(tmp_path, capsys, "is a VAR/NSP-format (blocks.*, head.*) checkpoint", "hmar", var_sd)
    fails_with(tmp_path, capsys, "use `python -m hmar_jax.convert hmar`", "var", hmar_sd)


def test_truncated_and_incomplete_files(tmp_path, hmar_sd, capsys):
    src = tmp_path / "good.pth"
    torch_pickle.save_state_dict(src, hmar_sd)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(src.read_bytes()[:4096])
    assert convert_main(["hmar", "--src", str(cut), "--out", str(tmp_path / "out")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    partial = {k: v for k, v in hmar_sd.items() if not k.startswith("mask_blocks.")}
    fails_with(tmp_path, capsys, "1 ns_blocks but 0 mask_blocks", "hmar", partial)
    no_head = {k: v for k, v in hmar_sd.items() if k != "mask_head.bias"}
    fails_with(tmp_path, capsys, "missing key 'mask_head.bias'", "hmar", no_head)
    bad_shape = dict(hmar_sd, **{"ns_blocks.0.ffn.fc1.bias": np.zeros(3, np.float32)})
    fails_with(tmp_path, capsys, "key 'ns_blocks.0.ffn.fc1.bias' has shape (3,), expected (512,)",
               "hmar", bad_shape)
    fails_with(tmp_path, capsys, "pass the matching --patch-nums", "hmar", hmar_sd,
               extra=["--patch-nums", "512"])
    flat_scale = dict(hmar_sd, **{"base_blocks.0.attn.scale_mul_1H11": np.ones(4, np.float32)})
    fails_with(tmp_path, capsys, "key 'base_blocks.0.attn.scale_mul_1H11' has shape (4,), not 4 "
               "nonzero sizes", "hmar", flat_scale)


def test_vqvae_file_and_stage2_file_are_recognised(tmp_path, hmar_sd, vqvae_state_dict, var_sd, capsys):
    fails_with(tmp_path, capsys, "VQ-VAE checkpoint", "hmar", vqvae_state_dict)
    stage2 = dict(var_sd, **{"mask_embed.weight": np.zeros((1, 128), np.float32)})
    fails_with(tmp_path, capsys, "stage-2 MaskedPrediction checkpoint", "var", stage2)


def test_var_pattern_flag(tmp_path, var_sd):
    assert run(tmp_path, "var", var_sd, extra=["--pattern", "block_diagonal"]) == 0
    cfg = checkpointing.load_hmar(tmp_path / "out").config
    assert cfg.attention_pattern == "block_diagonal" and cfg.num_mask_layers == 0


def test_expected_layout_counts_match_upstream():
    cfg = preset("d16")
    assert len(hmar_convert.expected_shapes(cfg, "hmar")) == 329
    assert len(hmar_convert.expected_shapes(cfg.replace(num_mask_layers=0), "var")) == 220
    assert len(hmar_convert.expected_shapes(preset("d30"), "hmar")) == 511


@pytest.mark.slow
def test_assemble_stage1_and_stage2_exports(tmp_path):
    cfg = preset("tiny")
    stage1 = HMARTransformer(cfg.replace(num_mask_layers=0), rngs=nnx.Rngs(1))
    stage2 = HMARTransformer(cfg, rngs=nnx.Rngs(2))
    checkpointing.save_hmar(tmp_path / "s1", stage1)
    checkpointing.save_hmar(tmp_path / "s2", stage2)
    assert convert_main(["assemble", "--stage1", str(tmp_path / "s1"), "--stage2", str(tmp_path / "s2"),
                         "--out", str(tmp_path / "combined")]) == 0
    combined = checkpointing.load_hmar(tmp_path / "combined")
    np.testing.assert_array_equal(np.asarray(combined.blocks.ffn.fc1.kernel[...]),
                                  np.asarray(stage1.blocks.ffn.fc1.kernel[...]))
    np.testing.assert_array_equal(np.asarray(combined.mask_blocks.ffn.fc1.kernel[...]),
                                  np.asarray(stage2.mask_blocks.ffn.fc1.kernel[...]))
    np.testing.assert_array_equal(np.asarray(combined.mask_embed[...]), np.asarray(stage2.mask_embed[...]))
    x = jnp.ones((1, cfg.layout.seq_len - 1, cfg.latent_channels))

    @nnx.jit  # one compile: run eagerly, every op of both forward passes compiles alone
    def forwards(a, b):
        return a(x, jnp.asarray([3])), b(x, jnp.asarray([3]))

    got, want = forwards(combined, stage1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # Exports of different architectures are refused.
    other = HMARTransformer(cfg.replace(width=32), rngs=nnx.Rngs(3))
    checkpointing.save_hmar(tmp_path / "s3", other)
    assert convert_main(["assemble", "--stage1", str(tmp_path / "s3"), "--stage2", str(tmp_path / "s2"),
                         "--out", str(tmp_path / "bad")]) == 2
