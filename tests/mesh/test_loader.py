"""Plugin files on plugin_path: imported once per content, afresh once edited."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import PluginError
from mesh.loader import load_class

PLUGIN = '''
from mesh import Plugin

class Tag(Plugin):
    VERSION = {version}

    async def handle(self, request, call_next):
        return await call_next(request)
'''


def test_an_unchanged_file_is_imported_once_and_an_edited_one_afresh(tmp_path: Path) -> None:
    (tmp_path / "tag.py").write_text(PLUGIN.format(version=1))
    first = load_class("tag.py:Tag", [tmp_path])
    assert load_class("tag.py:Tag", [tmp_path]) is first
    (tmp_path / "tag.py").write_text(PLUGIN.format(version=2))
    second = load_class("tag.py:Tag", [tmp_path])
    assert (first.VERSION, second.VERSION) == (1, 2)


def test_a_file_that_fails_to_import_is_not_kept(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("raise RuntimeError('at import')\n")
    with pytest.raises(PluginError, match="at import"):
        load_class("bad.py:Bad", [tmp_path])
    (tmp_path / "bad.py").write_text(PLUGIN.format(version=3).replace("Tag", "Bad"))
    assert load_class("bad.py:Bad", [tmp_path]).VERSION == 3
