import pytest
import ray


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster for the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
