import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster for the module."""
    import ray  # imported here so GPU-only tests in this package run where Ray is absent
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
