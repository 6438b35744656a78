"""Maps the repository's top-level folders into the one import package ``mlmscope`` (metadata: pyproject.toml).

The layout is ``mlmscope/__init__.py`` plus the folders ``checkpoints/``, ``probes/``, ``analyses/`` and ``app/``, which
become ``mlmscope.checkpoints`` and so on. Packages are discovered (every folder with an ``__init__.py``), so a new
subpackage is shipped without touching this file.
"""

from setuptools import find_packages, setup

TOP = "mlmscope"
ROOTS = sorted(p for p in find_packages(exclude=["tests", "tests.*", TOP, f"{TOP}.*"]) if "." not in p)

setup(
    packages=[TOP] + [f"{TOP}.{p}" for p in find_packages(include=[f"{r}" for r in ROOTS] + [f"{r}.*" for r in ROOTS])],
    package_dir={TOP: TOP, **{f"{TOP}.{r}": r for r in ROOTS}},
)
