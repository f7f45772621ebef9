"""`python -m hmar_jax.convert vqvae`: validation and error messages."""

import json

import numpy as np

from hmar_jax.convert import torch_pickle
from hmar_jax.convert import vqvae as vqvae_convert
from hmar_jax.convert.__main__ import main as convert_main


def run_convert(tmp_path, state_dict=None, src=None, extra=()):
    if src is None:
        src = tmp_path / "vae.pth"
        torch_pickle.save_state_dict(src, state_dict)
    return convert_main(["vqvae", "--src", str(src), "--out", str(tmp_path / "out"), *extra])


def assert_fails(tmp_path, capsys, pattern, **kwargs):
    assert run_convert(tmp_path, **kwargs) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1, message
    assert pattern in message, message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    return message


def test_success_writes_export_and_metadata(tmp_path, vqvae_state_dict, capsys):
    assert run_convert(tmp_path, vqvae_state_dict) == 0
    out = tmp_path / "out"
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["ch"] == 32 and config["patch_nums"] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["source_file"] == "vae.pth" and len(metadata["source_sha256_prefix"]) == 12
    assert "wrote" in capsys.readouterr().out
    # A second conversion into the same directory is refused unless --overwrite.
    assert run_convert(tmp_path, vqvae_state_dict) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_convert(tmp_path, vqvae_state_dict, extra=["--overwrite", "--patch-nums", "512"]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["patch_nums"][-1] == 32


def test_truncated_file(tmp_path, vqvae_state_dict, capsys):
    good = tmp_path / "good.pth"
    torch_pickle.save_state_dict(good, vqvae_state_dict)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = assert_fails(tmp_path, capsys, "truncated.pth", src=bad)
    assert "zip" in message.lower() or "truncated" in message.lower()


def test_foreign_files(tmp_path, vqvae_state_dict, hmar_fixture, capsys):
    npz = tmp_path / "weights.npz"
    np.savez(npz, a=np.zeros(3))
    assert_fails(tmp_path, capsys, "npz", src=npz)
    hmar_sd = {k[3:]: v for k, v in hmar_fixture.items() if k.startswith("sd/")}
    assert_fails(tmp_path, capsys, "transformer checkpoint", state_dict=hmar_sd)
    assert_fails(tmp_path, capsys, "Not a VAR VQ-VAE state_dict", state_dict={"w": np.zeros(2)})


def test_missing_key_names_it(tmp_path, vqvae_state_dict, capsys):
    state_dict = dict(vqvae_state_dict)
    del state_dict["decoder.up.2.block.1.norm2.bias"]
    assert_fails(tmp_path, capsys, "missing key 'decoder.up.2.block.1.norm2.bias'",
                 state_dict=state_dict)


def test_wrong_shape_names_it(tmp_path, vqvae_state_dict, capsys):
    state_dict = dict(vqvae_state_dict)
    state_dict["encoder.mid.attn_1.proj_out.weight"] = np.zeros((128, 128, 3, 3), np.float32)
    assert_fails(tmp_path, capsys, "key 'encoder.mid.attn_1.proj_out.weight' has shape "
                 "(128, 128, 3, 3), expected (128, 128, 1, 1)", state_dict=state_dict)


def test_extra_key_names_it(tmp_path, vqvae_state_dict, capsys):
    state_dict = dict(vqvae_state_dict, **{"decoder.extra.weight": np.zeros(1, np.float32)})
    assert_fails(tmp_path, capsys, "unexpected key 'decoder.extra.weight'", state_dict=state_dict)


def test_config_is_inferred_from_shapes(vqvae_state_dict):
    cfg = vqvae_convert.infer_config(vqvae_state_dict, "512")
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks) == (32, (1, 1, 2, 2, 4), 2)
    assert cfg.using_sa and cfg.using_mid_sa and cfg.image_size == 512
    layout = vqvae_convert.expected_layout(cfg)
    assert len(layout) == 323  # 324 entries minus the ema_vocab_hit_SV buffer
    assert layout["encoder.conv_in.weight"][1] == (32, 3, 3, 3)


def test_damaged_shapes_the_config_is_read_from_name_the_key(tmp_path, vqvae_state_dict, capsys):
    no_level = {k: v for k, v in vqvae_state_dict.items()
                if k != "encoder.down.1.block.0.conv1.weight"}
    assert_fails(tmp_path, capsys, "missing key 'encoder.down.1.block.0.conv1.weight'",
                 state_dict=no_level)
    zero_width = dict(vqvae_state_dict, **{"encoder.conv_in.weight": np.zeros((0, 3, 3, 3), np.float32)})
    assert_fails(tmp_path, capsys, "key 'encoder.conv_in.weight' has shape (0, 3, 3, 3), not 4 "
                 "nonzero sizes", state_dict=zero_width)
