# Packaging lives in pyproject.toml; this shim keeps `pip install -e .` working with older pip/setuptools.
from setuptools import setup

setup()
