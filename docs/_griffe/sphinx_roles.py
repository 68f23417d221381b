"""A griffe extension for the API reference (mkdocs.yml): medcam's docstrings use Sphinx roles
(``:class:`~medcam.data.VolumeCase```) and reST literal-block markers (``text::``), which Markdown would print as
they are. Roles become code spans of the name (the last part for ``~``); ``::`` ending a line becomes ``:``."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`(~?)([^`<]+?)(?:\s*<[^`>]*>)?`")


def _role(match: re.Match[str]) -> str:
    name = match.group(2).strip()
    return f"`{name.rsplit('.', 1)[-1] if match.group(1) else name}`"


def rewrite(text: str) -> str:
    """The docstring ``text`` with Sphinx roles as code spans and ``::`` literal-block markers as ``:``."""
    text = _ROLE.sub(_role, text)
    return re.sub(r"(?m)(\S)::$", r"\1:", text)


class SphinxRoles(griffe.Extension):
    """Rewrite each docstring once, when griffe has loaded the object."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
