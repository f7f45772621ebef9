"""Multi-scale VQ-VAE tokenizer on the embedded 8x8 digits (CPU-sized).

Trains VAR's tokenizer (reconstruction + commitment + codebook losses, dead-code
restarts) on scikit-learn's bundled digits upsampled to 16x16: a 2x down-sampling
encoder gives an 8x8 latent and the pyramid 1,2,3,4,6,8 (L = 130 tokens).

Launch:
  python -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py --workdir workdirs/digits
Quick smoke run:
  python -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py:runlocal --workdir /tmp/t

Outputs in the workdir: ``tokenizer/`` (params + tokenizer_config.json, loadable with
``hmar_jax.checkpointing.load_tokenizer``), ``tokenizer_reconstructions.png`` (rows:
originals, then the reconstruction after each scale), ``tokenizer_metrics.json``,
TensorBoard events and Orbax training checkpoints under ``tokenizer_ckpt/``.
"""

import ml_collections

from hmar_jax import config_files


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    runlocal = config_files.parse_arg(arg, runlocal=False)["runlocal"]
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"          # the embedded scikit-learn digits
    config.data.image_size = 16          # must equal tokenizer downsample * last patch_num

    config.tokenizer = ml_collections.ConfigDict()
    config.tokenizer.vocab_size = 256
    config.tokenizer.z_channels = 16
    config.tokenizer.ch = 32
    config.tokenizer.ch_mult = (1, 2)    # one 2x down-sampling: 16 px -> 8x8 latent
    config.tokenizer.num_res_blocks = 1
    config.tokenizer.using_sa = True
    config.tokenizer.using_mid_sa = True
    config.tokenizer.in_channels = 3
    config.tokenizer.norm_groups = 8
    config.tokenizer.quant_resi = 0.5
    config.tokenizer.share_quant_resi = 4
    config.tokenizer.beta = 0.25
    config.tokenizer.patch_nums = (1, 2, 3, 4, 6, 8)

    # How it runs: exact float32 convolutions (the trained weights do not depend on the
    # platform's fast float32); the other fields at the platform's defaults.
    config.execution = config_files.execution(tokenizer_precision="highest")

    config.batch_size = 64
    config.num_train_steps = 300         # 12 epochs of the 1,600 training digits
    config.learning_rate = 2e-3          # peak of a warm-up + cosine schedule
    config.warmup_steps = 30
    config.weight_decay = 0.0
    config.grad_clip_norm = 1.0

    config.codebook = ml_collections.ConfigDict()
    config.codebook.usage_decay = 0.99   # EMA of per-code assignment counts per step
    config.codebook.restart_every = 25   # steps between dead-code restarts (0 disables)
    config.codebook.dead_fraction = 0.03 # dead: EMA usage below this fraction of the mean
    config.codebook.stop_restarts_at = 0.8  # no restarts in the last 20% of training

    config.log_every_steps = 50
    config.checkpoint_every_steps = 400
    config.max_checkpoints_to_keep = 2
    config.eval_batch_size = 197
    config.grid_examples = 12

    if runlocal:
        config.num_train_steps = 30
        config.warmup_steps = 5
        config.log_every_steps = 10
        config.checkpoint_every_steps = 20
        config.codebook.restart_every = 10
    return config
