"""The native lane's C extension (app/_lane.c; see app.serving.native). Everything else
is in pyproject.toml. Optional: without a C compiler the install goes on without it and
the Python path answers every query."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("app._lane", ["app/_lane.c"], optional=True, extra_compile_args=["-O2"])])
