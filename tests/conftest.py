"""Test setup: 8 forced CPU devices (set before jax is imported) and parsed absl flags."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs are tiny and compiled once each, so on CPU compilation dominates the
# run: LLVM without its optimisation passes compiles them much faster, and the tests
# (tolerances against references, identities between runs of one program) do not depend on
# it. The kernel tests also run on a GPU (``JAX_PLATFORMS=cuda``), compiled as usual.
_CPU_FLAGS = " --xla_backend_optimization_level=0" if os.environ["JAX_PLATFORMS"] == "cpu" else ""
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8" + _CPU_FLAGS).strip()
# One persistent compilation cache for the run, inherited by the xdist workers and by the CLI
# subprocesses some tests start: many tests compile the same tiny training step (a SIGKILLed
# run and its restart compile it three times). Kept in .pytest_cache (``make clean``).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax_cache"))
# Every compilation is cached, not only those over JAX's default 1 s: the two workers and the
# CLI subprocesses compile many of the same small programs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def pytest_runtest_setup(item):
    """``@pytest.mark.devices(n)``: the mesh tests need n devices. The CPU run forces 8; the
    kernel tests can also run on one GPU (``JAX_PLATFORMS=cuda``), where these are skipped."""
    marker = item.get_closest_marker("devices")
    if marker is not None:
        import jax

        if jax.device_count() < marker.args[0]:
            pytest.skip(f"needs {marker.args[0]} devices, {jax.device_count()} present")


@pytest.fixture
def exact_float32_matmuls():
    """Float32 matmuls at full precision, for the kernel test modules (``pytestmark``). On
    CPU this changes nothing; on a GPU (the kernel tests also run there with
    ``JAX_PLATFORMS=cuda``) XLA's default float32 matmul is TF32, whose rounding (~1e-3)
    would swamp the float32 tolerances of kernel-vs-XLA checks."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


def pytest_collection_modifyitems(items):
    """Tests marked ``slow`` first (stable sort): under ``-n auto --dist loadscope`` their
    modules are handed out first, so no worker starts a long module at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def vqvae_fixture() -> dict[str, np.ndarray]:
    """Upstream VAR VQ-VAE outputs (see tests/fixtures/README.md)."""
    with np.load(FIXTURES / "vqvae_small.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def vqvae_state_dict(vqvae_fixture) -> dict[str, np.ndarray]:
    return {k[len("sd/"):]: v for k, v in vqvae_fixture.items() if k.startswith("sd/")}


@pytest.fixture(scope="session")
def hmar_fixture() -> dict[str, np.ndarray]:
    """Upstream HMAR outputs (see tests/fixtures/README.md)."""
    with np.load(FIXTURES / "hmar_small.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def tokenizer_export(tmp_path_factory) -> str:
    """A small random tokenizer export for 16 px digits (training it is tested elsewhere)."""
    from flax import nnx

    from hmar_jax import checkpointing
    from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                      using_sa=False, norm_groups=4, patch_nums=(1, 2, 3, 4, 6, 8))
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    checkpointing.save_tokenizer(path, VQVAE(cfg, rngs=nnx.Rngs(0)))
    return str(path)
