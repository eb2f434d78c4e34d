"""The explicit package list in pyproject.toml names every package in the tree (none is left out of a
non-editable install), and the shipped model configs are package data."""

from __future__ import annotations

import os

import pytest
from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")


def test_every_package_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)["tool"]["setuptools"]
    in_tree = set(find_packages(ROOT, include=["bus_kernels*", "bus_model*"]))
    in_tree |= {"bus_benchmarks" + p[len("benchmarks"):] for p in find_packages(ROOT, include=["benchmarks*"])}
    assert set(config["packages"]) == in_tree
    assert config["package-dir"]["bus_benchmarks"] == "benchmarks"
    assert "configs/*.json" in config["package-data"]["bus_model"]
