# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The guides docs/*.md as antsibull-docs extra docs (docs/docsite/rst/*.rst + docs/docsite/extra-docs.yml).

antsibull-docs 2.28 takes extra docs as reStructuredText only: it collects docs/docsite/rst/**.rst,
and extra-docs.yml's toctree entries must name those files (lint-collection-docs checks it). The
guides are written and read as Markdown (GitHub, the tarball), so the Markdown stays the source and
this script writes the RST from it. The RST is committed, so that anyone building the collection's
docs from the tarball (docs.ansible.com's way: antsibull-docs over installed collections) gets the
guides; scripts/docs.sh fails when the committed RST is not what this script writes now.

    python scripts/md2rst.py --write        regenerate docs/docsite/rst/ and extra-docs.yml
    python scripts/md2rst.py --check        exit 1 (listing the files) when they are out of date

Links between the guides become :ref: links to labels (each document and each heading gets one,
named after GitHub's heading anchors, so ``drills.md#the-throwaway-vm`` keeps working); a link to
a role's README or a module's source becomes a link to its page; links to other files of the
repository become literal paths (the collection has no public repository URL to point at);
http(s) links stay links. Needs markdown-it-py (installed with ansible-lint/rich).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import unicodedata

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OUT = DOCS / "docsite" / "rst"
INDEX = DOCS / "docsite" / "extra-docs.yml"
LABEL_PREFIX = "ansible_collections.vmbackup.libvirt.docsite."

# The sections of the rendered docs (extra-docs.yml), in order. A guide docs/<name>.md that is not
# listed here lands in the last section, so that no guide is left out of the docs.
SECTIONS = [
    ("Scenario guides", ["guide", "policy-check", "awx"]),
    ("Topics", ["consistency", "snapshots", "snapshots-and-backups", "retention", "drills"]),
    ("Reference", ["guarantees", "repository-format", "error-codes", "performance"]),
    ("Development", ["testing"]),
]
OTHER_SECTION = "More guides"

ADORNMENTS = "=-^\"'~"
# The languages Sphinx highlights here; anything else (and a block its lexer finds errors in) is text.
LEXERS = {"yaml": "yaml", "yml": "yaml", "json": "json", "sh": "shell", "bash": "shell", "shell": "shell",
          "console": "console", "shell-session": "console", "ini": "ini", "python": "python", "py": "python",
          "xml": "xml", "jinja": "jinja", "text": "text", "": "text"}
START_OK = set(" \n\t'\"([{<-/:\u2018\u201c\u2019\u00ab\u00a1\u00bf\u2010\u2011\u2012\u2013\u2014")
END_OK = set(" \n\t'\".,:;!?-)]}/\\>\u2019\u201d\u00bb\u2010\u2011\u2012\u2013\u2014")


class ConversionError(Exception):
    pass


def slugify(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKC", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def doc_label(doc: str, anchor: str | None = None) -> str:
    return LABEL_PREFIX + doc + (("." + anchor) if anchor else "")


def escape_text(text: str) -> str:
    text = text.replace("\\", "\\\\")
    for char in "*`|_":
        text = text.replace(char, "\\" + char)
    return text.replace("::", ":\\:")  # "text::" would start a literal block


# Paragraph starts that RST reads as a block of its own (an enumerated or bullet list, a comment or
# directive, a field or option list), where Markdown had plain text: the first character is escaped.
BLOCK_START = re.compile(r"^(?:[-*+]( |$)|(?:[A-Za-z]|[ivxlcdmIVXLCDM]+|\d+|#)[.)]( |$)|\(\w+\)( |$)|\.\.( |$)|:\w[^:]*:( |$)|--?\w)")


def guard_block_start(text: str) -> str:
    return "\\" + text if BLOCK_START.match(text) else text


def plain_text(node: SyntaxTreeNode) -> str:
    if node.type in ("text", "code_inline"):
        return node.content
    if node.type in ("softbreak", "hardbreak"):
        return " "
    return "".join(plain_text(c) for c in node.children)


def lex_ok(language: str, code: str) -> bool:
    from pygments.lexers import get_lexer_by_name  # pylint: disable=import-outside-toplevel
    from pygments.token import Error  # pylint: disable=import-outside-toplevel
    try:
        lexer = get_lexer_by_name(language)
    except Exception:  # pylint: disable=broad-except
        return False
    return not any(tok is Error or tok in Error for tok, dummy in lexer.get_tokens(code))


class Converter:
    def __init__(self, doc: str, docs: set[str]):
        self.doc = doc
        self.docs = docs
        self.slugs: dict[str, int] = {}
        self.levels: list[int] = []
        self.title_seen = False

    # ------------------------------------------------------------------ inline
    def inline(self, node: SyntaxTreeNode) -> str:
        """RST for an inline node's children; markup gets escaped spaces where RST needs a boundary."""
        parts: list[tuple[str, str]] = []  # (kind, text): kind "text" or "markup"
        self._inline_parts(node, parts)
        out = ""
        for i, (kind, text) in enumerate(parts):
            if kind == "markup":
                if out and out[-1] not in START_OK:
                    out += "\\ "
                out += text
                nxt = parts[i + 1][1] if i + 1 < len(parts) else ""
                if nxt and nxt[0] not in END_OK:
                    out += "\\ "
            else:
                out += text
        return out

    def _inline_parts(self, node: SyntaxTreeNode, parts: list[tuple[str, str]]) -> None:
        for child in node.children:
            kind = child.type
            if kind == "text":
                parts.append(("text", escape_text(child.content)))
            elif kind == "softbreak":
                parts.append(("text", "\n"))
            elif kind == "hardbreak":
                parts.append(("text", "\n"))
            elif kind == "code_inline":
                parts.append(("markup", self.literal(child.content)))
            elif kind in ("em", "strong"):
                mark = "*" if kind == "em" else "**"
                inner = plain_text(child)
                if not inner.strip():
                    continue
                parts.append(("markup", mark + escape_text(inner) + mark))
            elif kind == "link":
                parts.append(self.link(child))
            elif kind == "html_inline":
                if not child.content.startswith("<!--"):
                    parts.append(("text", escape_text(child.content)))
            elif kind == "image":
                parts.append(("text", escape_text(plain_text(child))))
            else:
                raise ConversionError(f"{self.doc}.md: inline {kind} is not supported")

    @staticmethod
    def literal(code: str) -> str:
        code = code.replace("\n", " ")
        if "``" in code or code.startswith(" ") or code.endswith(" ") or code.endswith("`"):
            return ":literal:`" + code.replace("\\", "\\\\").replace("`", "\\`") + "`"
        return "``" + code + "``"

    def link(self, node: SyntaxTreeNode) -> tuple[str, str]:
        href = node.attrs.get("href", "")
        text = plain_text(node).strip() or href
        if re.match(r"^(https?|mailto):", href):
            return ("markup", f"`{self.role_text(text)} <{href}>`__")
        path, dummy, anchor = href.partition("#")
        if not path and anchor:
            return ("markup", f":ref:`{self.role_text(text)} <{doc_label(self.doc, anchor)}>`")
        target = (DOCS / path).resolve() if path else None
        if target is not None and target.parent == DOCS.resolve() and target.suffix == ".md" and target.stem in self.docs:
            return ("markup", f":ref:`{self.role_text(text)} <{doc_label(target.stem, anchor or None)}>`")
        # Another file of the repository: a role's README or a module links to its page in the
        # rendered docs; anything else is named by its path (relative to the collection root).
        if target is not None:
            try:
                rel = target.relative_to(ROOT).as_posix()
            except ValueError:
                rel = path
        else:
            rel = href
        plugin = re.fullmatch(r"roles/(\w+)/README\.md|plugins/modules/(\w+)\.py", rel)
        if plugin and (ROOT / rel).is_file():
            fqcn = f"vmbackup.libvirt.{plugin.group(1) or plugin.group(2)}#{'role' if plugin.group(1) else 'module'}"
            return ("markup", f":ansplugin:`{self.role_text(text)} <{fqcn}>`")
        if text in (rel, path, href):
            return ("markup", self.literal(rel))  # the path itself (an anchor in it is GitHub's, dropped)
        if anchor:
            rel += "#" + anchor
        return ("text", escape_text(text) + " (" + self.literal(rel) + ")")

    @staticmethod
    def role_text(text: str) -> str:
        return text.replace("\\", "\\\\").replace("`", "\\`").replace("<", "\\<")

    # ------------------------------------------------------------------ blocks
    def blocks(self, nodes: list[SyntaxTreeNode]) -> list[str]:
        out: list[str] = []
        for node in nodes:
            chunk = self.block(node)
            if chunk is not None:
                out.append(chunk)
        return out

    def block(self, node: SyntaxTreeNode) -> str | None:
        kind = node.type
        if kind == "heading":
            return self.heading(node)
        if kind == "paragraph":
            return guard_block_start(self.inline(node.children[0]))
        if kind in ("bullet_list", "ordered_list"):
            return self.listing(node)
        if kind in ("fence", "code_block"):
            return self.code(node)
        if kind == "table":
            return self.table(node)
        if kind == "blockquote":
            # An empty comment ends whatever came before (a table, a list, a code block), so the
            # indented quote is not read as part of it.
            return "..\n\n" + indent("\n\n".join(self.blocks(node.children)), "    ")
        if kind == "hr":
            return "----"
        if kind == "html_block":
            content = node.content.strip()
            if content.startswith("<!--") and content.endswith("-->"):
                return None  # comments (e.g. the quick start markers) are not rendered on GitHub either
            raise ConversionError(f"{self.doc}.md: an HTML block is not supported: {content[:60]!r}")
        raise ConversionError(f"{self.doc}.md: block {kind} is not supported")

    def heading(self, node: SyntaxTreeNode) -> str:
        level = int(node.tag[1:])
        while self.levels and self.levels[-1] >= level:
            self.levels.pop()
        self.levels.append(level)
        depth = len(self.levels)
        if depth > len(ADORNMENTS):
            raise ConversionError(f"{self.doc}.md: headings nested too deep")
        title = self.inline(node.children[0]).replace("\n", " ")
        slug = slugify(plain_text(node))
        count = self.slugs.get(slug, 0)
        self.slugs[slug] = count + 1
        anchor = slug if count == 0 else f"{slug}-{count}"
        width = max(len(title), 3)
        lines = [f".. _{doc_label(self.doc, anchor)}:", ""]
        if not self.title_seen:
            if level != 1:
                raise ConversionError(f"{self.doc}.md: the first heading must be the page title (#)")
            lines = [f".. _{doc_label(self.doc)}:"] + lines
            self.title_seen = True
        lines += [title, ADORNMENTS[depth - 1] * width]
        return "\n".join(lines)

    def listing(self, node: SyntaxTreeNode) -> str:
        ordered = node.type == "ordered_list"
        start = int(node.attrs.get("start", 1)) if ordered else 1
        items = []
        for number, item in enumerate(node.children, start):
            marker = f"{number}. " if ordered else "- "
            body = "\n\n".join(self.blocks(item.children)) or "\\"
            items.append(marker + indent(body, " " * len(marker))[len(marker):])
        simple = all(len(item.children) <= 1 and all(c.type == "paragraph" for c in item.children) for item in node.children)
        return ("\n" if simple else "\n\n").join(items)

    def code(self, node: SyntaxTreeNode) -> str:
        info = (node.info or "").strip().split()[0] if (node.info or "").strip() else ""
        language = LEXERS.get(info.lower(), "text")
        content = node.content.rstrip("\n")
        if language != "text" and not lex_ok(language, content):
            language = "text"
        if not content.strip():
            content = " "
        return f".. code-block:: {language}\n\n" + indent(content, "   ")

    def table(self, node: SyntaxTreeNode) -> str:
        rows: list[list[str]] = []
        header = 0
        for section in node.children:
            for row in section.children:
                cells = [guard_block_start(self.inline(cell.children[0]).replace("\n", " ")) if cell.children else ""
                         for cell in row.children]
                rows.append(cells)
                if section.type == "thead":
                    header += 1
        lines = [".. list-table::", f"   :header-rows: {header}", ""]
        for row in rows:
            for i, cell in enumerate(row):
                bullet = "   * - " if i == 0 else "     - "
                lines.append((bullet + cell).rstrip())
        return "\n".join(lines)


def indent(text: str, prefix: str) -> str:
    return "\n".join((prefix + line) if line.strip() else "" for line in text.split("\n"))


def convert(doc: str, markdown: str, docs: set[str]) -> str:
    parser = MarkdownIt("commonmark").enable("table")
    tree = SyntaxTreeNode(parser.parse(markdown))
    converter = Converter(doc, docs)
    body = "\n\n".join(converter.blocks(tree.children))
    header = (f"..\n  Generated from docs/{doc}.md by scripts/md2rst.py: edit the Markdown, then run\n"
              f"  python scripts/md2rst.py --write (scripts/docs.sh checks that this file is up to date).\n\n")
    if not converter.title_seen:
        raise ConversionError(f"docs/{doc}.md has no top-level heading (the title of its page)")
    return header + body.rstrip() + "\n"


def extra_docs_index(docs: list[str]) -> str:
    lines = ["---", "# Generated by scripts/md2rst.py from the guides docs/*.md (see its docstring).", "sections:"]
    listed: set[str] = set()
    sections = []
    for title, names in SECTIONS:
        present = [n for n in names if n in docs]
        listed.update(names)
        if present:
            sections.append((title, present))
    rest = sorted(d for d in docs if d not in listed)
    if rest:
        sections.append((OTHER_SECTION, rest))
    for title, names in sections:
        lines.append(f"  - title: {title}")
        lines.append("    toctree:")
        lines.extend(f"      - {name}" for name in names)
    return "\n".join(lines) + "\n"


def expected_files(docs_dir: pathlib.Path = DOCS) -> dict[pathlib.Path, str]:
    """Every generated file (path relative to the collection root) and its content."""
    sources = sorted(p for p in docs_dir.glob("*.md"))
    docs = [p.stem for p in sources]
    files = {}
    for path in sources:
        files[pathlib.Path("docs/docsite/rst") / f"{path.stem}.rst"] = convert(path.stem, path.read_text(encoding="utf-8"), set(docs))
    files[pathlib.Path("docs/docsite/extra-docs.yml")] = extra_docs_index(docs)
    return files


def stale_files(root: pathlib.Path = ROOT) -> list[str]:
    """The generated files that differ from what this script writes now, or should not be there."""
    expected = expected_files(root / "docs")
    stale = [str(rel) for rel, text in sorted(expected.items())
             if not (root / rel).is_file() or (root / rel).read_text(encoding="utf-8") != text]
    for path in sorted((root / "docs" / "docsite" / "rst").glob("*.rst")):
        rel = path.relative_to(root)
        if rel not in expected:
            stale.append(f"{rel} (no docs/{path.stem}.md)")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="regenerate docs/docsite/rst/*.rst and extra-docs.yml")
    group.add_argument("--check", action="store_true", help="fail when they are not up to date")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_files()
            for name in stale:
                print(f"out of date: {name}", file=sys.stderr)
            if stale:
                print("run: python scripts/md2rst.py --write", file=sys.stderr)
            return 1 if stale else 0
        expected = expected_files()
        OUT.mkdir(parents=True, exist_ok=True)
        for path in OUT.glob("*.rst"):
            if path.relative_to(ROOT) not in expected:
                path.unlink()
        for rel, text in expected.items():
            (ROOT / rel).write_text(text, encoding="utf-8")
        print(f"wrote {len(expected)} files")
        return 0
    except ConversionError as exc:
        print(f"md2rst: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
