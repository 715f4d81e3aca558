"""Repository-wide pytest setting: the default run executes every benchmark once, untimed
(``--benchmark-disable``), so they cannot rot; ``--benchmark-only`` or ``--benchmark-enable``
times them. (A ``--benchmark-disable`` in addopts would make ``--benchmark-only`` an error.)"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not (config.getoption("benchmark_only", False)
            or config.getoption("benchmark_enable", False)):
        config.option.benchmark_disable = True
