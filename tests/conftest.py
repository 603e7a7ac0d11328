# Make the collection importable as ansible_collections.vmbackup.libvirt for unit tests.
# pytest-ansible's --ansible-unit-inject-only (set in pytest.ini) injects ANSIBLE_COLLECTIONS_PATH
# into the collection loader; this points that variable at a tree that links to this checkout.
# Integration tests do not rely on it: they build and install the collection tarball themselves.
from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Outside the checkout, so that no symlink loop sits inside the collection tree.
_TREE = pathlib.Path(tempfile.gettempdir()) / f"vmbackup-collections-{hashlib.sha256(bytes(ROOT)).hexdigest()[:8]}"
_LINK = _TREE / "ansible_collections" / "vmbackup" / "libvirt"

if not _LINK.is_symlink():
    _LINK.parent.mkdir(parents=True, exist_ok=True)
    _LINK.symlink_to(ROOT, target_is_directory=True)
os.environ["ANSIBLE_COLLECTIONS_PATH"] = str(_TREE)
