"""Dashboard pages: one small module per page, each with ``TITLE`` and ``render(view)``.

To add a page, write ``app/views/<name>.py`` with ``TITLE`` and ``render(view: mlmscope.app.views.common.View)`` and
add its name to :data:`PAGES`; it then appears in the sidebar and follows the global step slider.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Page slugs in sidebar order (the slug is the module name and the ``?page=`` query parameter).
PAGES: tuple[str, ...] = ("overview", "syntax", "attention", "mask_rank", "outliers", "redundancy", "lens", "live")


def page_module(slug: str) -> ModuleType:
    """The module of page ``slug`` (imported on first use)."""
    if slug not in PAGES:
        raise KeyError(f"unknown dashboard page {slug!r}; pages: {', '.join(PAGES)}")
    return importlib.import_module(f"{__name__}.{slug}")
