"""Shared pytest options. ``--many`` (or SERVESIM_MANY=1) runs the property-based tests with
tens of thousands of examples instead of the few hundred CI runs."""

from __future__ import annotations

import os


def pytest_addoption(parser):
    parser.addoption(
        "--many",
        action="store_true",
        default=False,
        help="run property-based tests with many more examples (slow)",
    )


def pytest_configure(config):
    if config.getoption("--many"):
        os.environ["SERVESIM_MANY"] = "1"
