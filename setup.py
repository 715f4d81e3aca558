"""Packaging: the metadata is in pyproject.toml; this file only maps the layout.

The jitted loops live in the top-level folder ``kernels/`` (so the architecture is visible in
the tree) but ship as the subpackage ``bnfast.kernels``: ``import kernels`` never works after an
install, and the package does not claim a generic top-level name.
"""

from setuptools import setup

setup(
    packages=["bnfast", "bnfast.kernels"],
    package_dir={"bnfast": "bnfast", "bnfast.kernels": "kernels"},
    package_data={"bnfast": ["py.typed"]},
    include_package_data=False,
    zip_safe=False,
)
