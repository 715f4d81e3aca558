"""Repository-wide pytest settings.

- The default run executes every benchmark once, untimed (``--benchmark-disable``), so they
  cannot rot; ``--benchmark-only`` or ``--benchmark-enable`` times them. (A
  ``--benchmark-disable`` in addopts would make ``--benchmark-only`` an error.)
- ``pytest --benchmark`` (the project's design card says so): the timed benchmarks only,
  printed as pytest-benchmark's comparison grouped by (operation, shape, dtype, threads), so
  bnfast, the NumPy reference and PyTorch sit side by side. Rounds stop after 0.25 s per
  benchmark unless ``--benchmark-max-time`` is given: the grid has over a thousand of them.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the timed benchmarks only (bench/), grouped side by side",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    option = config.option
    if config.getoption("benchmark"):
        option.benchmark_only = True
        option.benchmark_enable = True
        option.benchmark_disable = False
        if "--benchmark-max-time" not in " ".join(config.invocation_params.args):
            option.benchmark_max_time = 0.25
    elif not (
        config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False)
    ):
        option.benchmark_disable = True
