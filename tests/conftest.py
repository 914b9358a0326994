import os
import tempfile

import pytest

# Tests run on the CPU unless a GPU test asks otherwise; several fake CPU devices for sharding.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
# Converted-params cache entries of test checkpoints stay out of the user's ~/.cache/jvt.
os.environ.setdefault("JVT_CACHE_DIR", tempfile.mkdtemp(prefix="jvt-test-cache-"))


def _gpu_available() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _gpu_available():
        skip = pytest.mark.skip(reason="no NVIDIA GPU visible to JAX")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def isa(request):
    """Each version of the host kernels (jvt_qmatmul, jvt_attention on the CPU), selected for
    the test: AVX-512 and AVX2 where this CPU has them (skipped elsewhere), the portable one
    always."""
    from jvt import _native

    if request.param not in _native.cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    before = _native.cpu_isa()
    _native.set_cpu_isa(request.param)
    yield request.param
    _native.set_cpu_isa(before)
