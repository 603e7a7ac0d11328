# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""scripts/md2rst.py: the Markdown constructs the guides use come out of Sphinx (warnings are
errors, as in scripts/docs.sh) as the same text, links and tables."""

from __future__ import annotations

import io
import pathlib
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
import md2rst  # noqa: E402  pylint: disable=wrong-import-position
sys.path.pop(0)

GUIDE = """# Title with `code`

Intro *em* and **strong**, a `literal`s glued, snake_case_word_ and a | pipe, a back\\slash, C::D.
A. Not a list.

## Section

- item one
- item [to the other](other.md#a-heading) and [out](https://example.org/x)
  continued

1. first
2. second

   ```yaml
   - name: x
   ```

| a | b |
|---|---|
| `x` | - |

> a quote

<!-- quickstart -->
```json
{"broken": ...}
```

See [the role's README](../roles/backup/README.md), [roles/backup/README.md](../roles/backup/README.md), [the weekly
playbook](../playbooks/backup_weekly.yml), [playbooks/verify.yml](../playbooks/verify.yml) and [above](#section).

## Section
"""

OTHER = """# Other

## A heading

Back to [the guide](guide.md).
"""


def sphinx_text(tmp_path: pathlib.Path, docs: dict[str, str]) -> dict[str, str]:
    from sphinx.cmd.build import build_main  # pylint: disable=import-outside-toplevel
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text("extensions = ['sphinx_antsibull_ext']\n")
    # The page antsibull-docs writes for the backup role (the guide links to the role's README).
    (src / "backup_role.rst").write_text(".. _ansible_collections.vmbackup.libvirt.backup_role:\n\nThe backup role\n===============\n")
    (src / "index.rst").write_text("Index\n=====\n\n.. toctree::\n\n   backup_role\n" + "".join(f"   {d}\n" for d in docs))
    for name, text in docs.items():
        (src / f"{name}.rst").write_text(md2rst.convert(name, text, set(docs)))
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = build_main(["-b", "text", "-W", "--keep-going", "-q", "-d", str(tmp_path / "doctrees"), str(src), str(tmp_path / "out")])
    assert rc == 0, err.getvalue()
    return {name: (tmp_path / "out" / f"{name}.txt").read_text() for name in docs}


def test_guides_render_without_warnings_and_keep_their_text(tmp_path):
    text = sphinx_text(tmp_path, {"guide": GUIDE, "other": OTHER})
    guide = text["guide"]
    flat = " ".join(guide.split())
    # (Sphinx's text builder shows literals in double quotes and keeps emphasis marks.)
    assert guide.startswith('Title with "code"\n')
    assert 'Intro *em* and **strong**, a "literal"s glued, snake_case_word_ and a | pipe, a back\\slash, C::D. A. Not a list.' in flat
    assert "* item to the other and out continued" in flat
    assert "1. first" in guide and "2. second" in guide and "- name: x" in guide
    assert "| a " in guide and '| "x" ' in guide and "|====" in guide  # a table, its header row and cells
    assert "a quote" in guide and "quickstart" not in guide and '{"broken": ...}' in guide
    assert ('See the role\'s README, roles/backup/README.md, the weekly playbook ("playbooks/backup_weekly.yml"), '
            '"playbooks/verify.yml" and above.') in flat
    assert "Back to the guide." in text["other"]


def test_labels_follow_githubs_anchors():
    rst = md2rst.convert("guide", GUIDE, {"guide", "other"})
    prefix = "ansible_collections.vmbackup.libvirt.docsite."
    for label in ("guide", "guide.title-with-code", "guide.section", "guide.section-1"):
        assert f".. _{prefix}{label}:\n" in rst, label
    assert f":ref:`to the other <{prefix}other.a-heading>`" in rst
    assert f":ref:`above <{prefix}guide.section>`" in rst
    assert ":ansplugin:`the role's README <vmbackup.libvirt.backup#role>`" in rst
    assert ".. code-block:: text\n\n   {\"broken\": ...}" in rst  # JSON that does not lex is shown as text
    assert ".. code-block:: yaml" in rst


@pytest.mark.parametrize("markdown, error", [
    ("# T\n\n<div>x</div>\n", "HTML block"),
    ("Text before any title.\n", "no top-level heading"),
    ("## Not a title\n", "page title"),
])
def test_what_it_cannot_render_is_refused(markdown, error):
    with pytest.raises(md2rst.ConversionError, match=error):
        md2rst.convert("guide", markdown, {"guide"})
