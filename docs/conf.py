"""Sphinx configuration for the trio_fork documentation."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "trio_fork"
author = "The trio_fork developers"
copyright = "2026, The trio_fork developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Types are shown for the parameters and results a docstring describes, so that the
# async context managers do not claim to return an AsyncIterator.
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Links to the standard library and to the frameworks trio_fork builds on. The
# inventories are not fetched (the build runs offline); references to them are
# plain text, and only our own cross-references are checked.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

html_theme = "alabaster"
html_title = "trio_fork"
