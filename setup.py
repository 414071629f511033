"""Installs the dopy package and the dopyserver and dopyclient scripts; pyproject.toml has the metadata."""

from setuptools import setup

setup()
