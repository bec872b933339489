# The native data plane is a cffi extension; everything else is in pyproject.toml.
from __future__ import annotations

from setuptools import setup

setup(cffi_modules=["vdev/_native/build.py:ffibuilder"])
