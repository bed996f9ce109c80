"""Sphinx configuration for the pyro_bmr documentation.

Build with ``sphinx-build -W -b html docs docs/_build`` from the repository root.
Only built-in extensions are used and nothing is fetched over the network.
"""

import configparser
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Import the checkout being documented, also when it is not installed.
sys.path.insert(0, ROOT)

_setup = configparser.ConfigParser()
_setup.read(os.path.join(ROOT, "setup.cfg"))

project = "pyro_bmr"
author = "pyro_bmr developers"
copyright = "pyro_bmr developers"
release = _setup.get("metadata", "version", fallback="0.0.0")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"

# Pyro, torch and the other runtime dependencies are installed in the ``dev`` environment,
# so autodoc imports them for real rather than mocking them.

html_theme = "alabaster"
html_title = f"pyro_bmr {release}"
html_theme_options = {
    "description": "Bayesian sparsification of Pyro models by Bayesian model reduction",
    "fixed_sidebar": True,
}
