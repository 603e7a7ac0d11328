# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for plugins/module_utils/_repository.py on temporary directories."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import random
import shutil
import stat
import tempfile
import uuid

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

VM = "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"


def _raises(code: str, func, *args, **kwargs) -> VmBackupError:
    with pytest.raises(VmBackupError) as info:
        func(*args, **kwargs)
    assert info.value.error_code == code, info.value.msg
    return info.value


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def base(tmp_path) -> str:
    """A real (symlink-free) directory path, as validate_repository_path would hand over."""
    return os.path.realpath(tmp_path)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def owner_write_semantics(monkeypatch):
    """Make unlink/rmdir honour a read-only parent directory even when the tests run as root.

    A non-root user cannot remove an entry from a directory without write permission; root can.
    This reproduces the non-root behaviour so that remove_tree's recovery path is exercised.
    """
    real_unlink, real_rmdir = os.unlink, os.rmdir

    def guard(real):
        def wrapper(path, *, dir_fd=None):
            if dir_fd is not None and not os.path.isabs(path):
                parent_mode = os.fstat(dir_fd).st_mode
            else:
                parent_mode = os.stat(os.path.dirname(os.path.abspath(path))).st_mode
            if not parent_mode & stat.S_IWUSR:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real(path, dir_fd=dir_fd)

        return wrapper

    monkeypatch.setattr(os, "unlink", guard(real_unlink))
    monkeypatch.setattr(os, "rmdir", guard(real_rmdir))


# --------------------------------------------------------------------------- validate_repository_path


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/srv/backups", "/srv/backups"),
        ("/srv/backups/", "/srv/backups"),
        ("/srv//backups", "/srv/backups"),
        ("/srv/./backups/.", "/srv/backups"),
        ("///srv/backups", "/srv/backups"),
        ("/a", "/a"),
        ("/srv/back ups/vm…", "/srv/back ups/vm…"),
    ],
)
def test_validate_repository_path_normalises(path, expected):
    assert repo_mod.validate_repository_path(path) == expected


# os.path.normpath keeps exactly two leading slashes (POSIX leaves "//" implementation-defined).


@pytest.mark.parametrize("path, expected", [("//a/b/", "/a/b"), ("//srv/backups", "/srv/backups")])
def test_validate_repository_path_collapses_leading_double_slash(path, expected):
    assert repo_mod.validate_repository_path(path) == expected


@pytest.mark.parametrize("path", ["//", "//."])
def test_validate_repository_path_rejects_double_slash_root(path):
    _raises("PATH_ESCAPE", repo_mod.validate_repository_path, path)


@pytest.mark.parametrize(
    "path, message",
    [
        ("", "absolute"),
        (None, "absolute"),
        (42, "absolute"),
        (b"/srv/backups", "absolute"),
        ("srv/backups", "relative"),
        ("./backups", "relative"),
        ("backups", "relative"),
        ("~/backups", "relative"),
        ("..", "relative"),
        ("/srv/../etc", "'..'"),
        ("/srv/backups/..", "'..'"),
        ("/..", "'..'"),
        ("/srv/backups/../../x", "'..'"),
        ("/", "root"),
        ("/.", "root"),
        ("/./", "root"),
        ("///", "root"),
        ("/srv/back\x00ups", "NUL"),
        ("/srv/back\nups", "newline"),
    ],
)
def test_validate_repository_path_rejects(path, message):
    err = _raises("PATH_ESCAPE", repo_mod.validate_repository_path, path)
    assert message in err.msg


def test_validate_repository_path_keeps_dotdot_lookalikes():
    assert repo_mod.validate_repository_path("/srv/..backups/a..b") == "/srv/..backups/a..b"


# --------------------------------------------------------------------------- inspect_repository


def test_inspect_missing_directory_creates_nothing(base):
    path = os.path.join(base, "repo")
    state = repo_mod.inspect_repository(path, create=True)
    assert state.exists is False
    assert state.repo_id is None
    assert state.path == path
    assert state.free_bytes > 0
    assert os.listdir(base) == []


def test_inspect_missing_directory_without_create_is_not_found(base):
    err = _raises("REPOSITORY_NOT_FOUND", repo_mod.inspect_repository, os.path.join(base, "repo"), create=False)
    assert "create_repository" in err.msg and "mounted" in err.msg
    assert os.listdir(base) == []


@pytest.mark.parametrize("create", [True, False])
def test_inspect_missing_parent_is_not_found_even_with_create(base, create):
    err = _raises("REPOSITORY_NOT_FOUND", repo_mod.inspect_repository, os.path.join(base, "a", "b", "repo"), create=create)
    assert os.path.join(base, "a", "b") in err.msg
    assert os.listdir(base) == []


@pytest.mark.parametrize("mode", [0o700, 0o711, 0o755, 0o750, 0o705])
def test_inspect_empty_directory(base, mode):
    path = os.path.join(base, "repo")
    os.mkdir(path)
    os.chmod(path, mode)
    state = repo_mod.inspect_repository(path)
    assert (state.exists, state.repo_id) == (True, None)
    assert os.listdir(path) == []
    assert _mode(path) == mode


def test_inspect_symlink_to_directory(base):
    os.mkdir(os.path.join(base, "real"))
    os.symlink(os.path.join(base, "real"), os.path.join(base, "repo"))
    err = _raises("UNSAFE_TARGET", repo_mod.inspect_repository, os.path.join(base, "repo"))
    assert "symbolic link" in err.msg


def test_inspect_dangling_symlink(base):
    os.symlink(os.path.join(base, "nowhere"), os.path.join(base, "repo"))
    err = _raises("UNSAFE_TARGET", repo_mod.inspect_repository, os.path.join(base, "repo"))
    assert "symbolic link" in err.msg
    assert not os.path.exists(os.path.join(base, "nowhere"))


@pytest.mark.parametrize("depth", [1, 2])
def test_inspect_path_through_symlinked_parent(base, depth):
    real = os.path.join(base, "real")
    os.makedirs(os.path.join(real, "x", "repo"))
    os.symlink(real, os.path.join(base, "link"))
    path = os.path.join(base, "link", "x", "repo") if depth == 2 else os.path.join(base, "link", "x")
    err = _raises("UNSAFE_TARGET", repo_mod.inspect_repository, path)
    assert f"{os.path.join(base, 'link')} is a symbolic link" in err.msg


def test_inspect_missing_directory_under_symlinked_parent(base):
    os.mkdir(os.path.join(base, "real"))
    os.symlink(os.path.join(base, "real"), os.path.join(base, "link"))
    _raises("UNSAFE_TARGET", repo_mod.inspect_repository, os.path.join(base, "link", "new", "repo"))


@pytest.mark.parametrize(
    "mode, who",
    [
        (0o777, "world"),
        (0o1777, "world"),
        (0o702, "world"),
        (0o757, "world"),
        (0o770, "group"),
        (0o720, "group"),
        (0o775, "group"),
        (0o776, "world"),  # both: world wins in the message
    ],
)
def test_inspect_writable_by_others(base, mode, who):
    path = os.path.join(base, "repo")
    os.mkdir(path)
    os.chmod(path, mode)
    err = _raises("UNSAFE_TARGET", repo_mod.inspect_repository, path)
    assert f"{who}-writable" in err.msg
    assert f"{stat.S_IMODE(mode):04o}" in err.msg
    state = repo_mod.inspect_repository(path, allow_unsafe_permissions=True)
    assert state.exists is True


def test_inspect_refuses_a_new_repository_in_a_world_writable_parent(base):
    # Another user could rename the new repository away and put a link in its place.
    os.chmod(base, 0o777)
    try:
        err = _raises("UNSAFE_TARGET", repo_mod.inspect_repository, os.path.join(base, "repo"))
        assert f"{base} is world-writable" in err.msg
        assert os.listdir(base) == []
    finally:
        os.chmod(base, 0o700)


def test_inspect_accepts_a_new_repository_in_a_root_owned_sticky_parent(base):
    os.chmod(base, 0o1777)
    try:
        assert repo_mod.inspect_repository(os.path.join(base, "repo")).exists is False
    finally:
        os.chmod(base, 0o700)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param({"file": "notes.txt"}, id="a-file"),
        pytest.param({"file": ".hidden"}, id="a-dotfile"),
        pytest.param({"dir": "vms"}, id="a-directory-without-marker"),
        pytest.param({"file": "vmbackup-repo.json.bak"}, id="a-marker-lookalike"),
    ],
)
def test_inspect_non_empty_directory_that_is_not_a_repository(base, content):
    path = os.path.join(base, "repo")
    os.mkdir(path)
    if "file" in content:
        with open(os.path.join(path, content["file"]), "w", encoding="utf-8") as fh:
            fh.write("x")
    else:
        os.mkdir(os.path.join(path, content["dir"]))
    err = _raises("UNSAFE_TARGET", repo_mod.inspect_repository, path)
    assert "not empty" in err.msg


@pytest.mark.parametrize("relative", ["repo", "repo/sub/deeper"])
def test_inspect_file_instead_of_directory(base, relative):
    with open(os.path.join(base, "repo"), "w", encoding="utf-8") as fh:
        fh.write("x")
    err = _raises("UNSAFE_TARGET", repo_mod.inspect_repository, os.path.join(base, relative))
    assert "is not a directory" in err.msg


def test_inspect_initialised_repository(base):
    path = os.path.join(base, "repo")
    repo_mod.Repository(path).initialise()
    marker = repo_mod.read_marker(path)
    state = repo_mod.inspect_repository(path)
    assert state.exists is True
    assert state.repo_id == marker["repo_id"]


@pytest.mark.parametrize(
    "marker, message",
    [
        pytest.param(b"", "cannot read", id="empty"),
        pytest.param(b"{not json", "cannot read", id="not-json"),
        pytest.param(b"\xff", "cannot read", id="not-utf8"),
        pytest.param(b"[]", "not a vmbackup.libvirt repository marker", id="array"),
        pytest.param(b'{"format": "vmbackup.libvirt/set", "format_version": 1, "repo_id": "x"}', "not a vmbackup", id="wrong-format"),
        pytest.param(b'{"format": "vmbackup.libvirt/repository", "format_version": 2, "repo_id": "x"}', "version 2", id="version-2"),
        pytest.param(b'{"format": "vmbackup.libvirt/repository", "repo_id": "x"}', "version None", id="no-version"),
    ],
)
def test_inspect_bad_marker(base, marker, message):
    path = os.path.join(base, "repo")
    os.mkdir(path)
    with open(os.path.join(path, repo_mod.REPO_MARKER), "wb") as fh:
        fh.write(marker)
    err = _raises("REPOSITORY_FORMAT", repo_mod.inspect_repository, path)
    assert message in err.msg


def test_inspect_marker_without_repo_id(base):
    path = os.path.join(base, "repo")
    os.mkdir(path)
    with open(os.path.join(path, repo_mod.REPO_MARKER), "wb") as fh:
        fh.write(b'{"format": "vmbackup.libvirt/repository", "format_version": 1}')
    _raises("REPOSITORY_FORMAT", repo_mod.inspect_repository, path)


# --------------------------------------------------------------------------- Repository


@pytest.mark.parametrize("relative", ["repo", "a/b/repo"])
def test_initialise(base, relative, umask_022):
    os.makedirs(os.path.dirname(os.path.join(base, relative)), exist_ok=True)
    path = os.path.join(base, relative)
    repo = repo_mod.Repository(path)
    assert repo.initialise() is True
    marker = repo_mod.read_marker(path)
    assert marker["format"] == "vmbackup.libvirt/repository"
    assert marker["format_version"] == 1
    assert str(uuid.UUID(marker["repo_id"])) == marker["repo_id"]
    _manifest.parse_iso(marker["created"])
    assert _mode(path) == 0o711
    assert _mode(os.path.join(path, "vms")) == 0o711
    assert _mode(os.path.join(path, repo_mod.REPO_MARKER)) == 0o644
    assert sorted(os.listdir(path)) == ["vmbackup-repo.json", "vms"]
    # A second run changes nothing and keeps the identity.
    assert repo.initialise() is False
    assert repo_mod.read_marker(path)["repo_id"] == marker["repo_id"]
    assert repo_mod.inspect_repository(path).repo_id == marker["repo_id"]


def test_initialise_existing_empty_directory_fixes_mode(base):
    path = os.path.join(base, "repo")
    os.mkdir(path, 0o700)
    assert repo_mod.Repository(path).initialise() is True
    assert _mode(path) == 0o711
    assert os.path.isfile(os.path.join(path, repo_mod.REPO_MARKER))


def _mkset(root: str, name: str, manifest: bool) -> None:
    os.makedirs(os.path.join(root, name))
    if manifest:
        with open(os.path.join(root, name, _manifest.MANIFEST_NAME), "wb") as fh:
            fh.write(b"{}")


def test_set_ids_and_all_ids(base):
    repo = repo_mod.Repository(os.path.join(base, "repo"))
    repo.initialise()
    repo.prepare_vm(VM)
    sets, staging = repo.sets_dir(VM), repo.staging_root(VM)
    # Created out of order on purpose: the listing must be sorted, not in directory order.
    _mkset(sets, "20261125T073512Z-002", manifest=True)
    _mkset(sets, "20261124T000000Z-001", manifest=True)
    _mkset(sets, "20261125T073512Z-001", manifest=True)
    _mkset(sets, "20261126T000000Z-001", manifest=False)  # renamed in but never committed
    _mkset(sets, "not-a-set-id", manifest=True)
    _mkset(staging, "20261127T000000Z-001", manifest=True)  # staging never counts as committed
    with open(os.path.join(sets, "20261124T000000Z-001.verify.json"), "w", encoding="utf-8") as fh:
        fh.write("{}")
    with open(os.path.join(sets, "20261128T000000Z-001"), "w", encoding="utf-8") as fh:
        fh.write("a file, not a set")
    os.symlink(os.path.join(sets, "20261124T000000Z-001"), os.path.join(sets, "20261129T000000Z-001"))

    assert repo.set_ids(VM) == ["20261124T000000Z-001", "20261125T073512Z-001", "20261125T073512Z-002"]
    assert repo.all_ids(VM) == [
        "20261124T000000Z-001",
        "20261125T073512Z-001",
        "20261125T073512Z-002",
        "20261126T000000Z-001",
        "20261127T000000Z-001",
        "20261128T000000Z-001",
        "20261129T000000Z-001",
    ]
    # A new id for "now" sorts after everything in use, staged or committed.
    new = _manifest.new_set_id(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), repo.all_ids(VM))
    assert new == "20261129T000000Z-002"


def test_set_ids_of_unknown_vm_creates_nothing(base):
    path = os.path.join(base, "repo")
    repo = repo_mod.Repository(path)
    assert repo.set_ids(VM) == []
    assert repo.all_ids(VM) == []
    assert repo.leftovers(VM) == []
    assert not os.path.lexists(path)


def test_prepare_vm_modes(base):
    repo = repo_mod.Repository(os.path.join(base, "repo"))
    repo.initialise()
    repo.prepare_vm(VM)
    assert _mode(repo.vm_dir(VM)) == 0o711
    assert _mode(repo.sets_dir(VM)) == 0o700
    assert _mode(repo.staging_root(VM)) == 0o711
    assert repo.lock_path(VM) == os.path.join(base, "repo", "vms", VM, "lock")


def test_staging_commit_and_read_manifest(base):
    repo = repo_mod.Repository(os.path.join(base, "repo"))
    repo.initialise()
    repo.prepare_vm(VM)
    set_id = "20261125T073512Z-001"
    staging = repo.create_staging(VM, set_id)
    assert _mode(staging) == 0o711
    data = b"disk data"
    repo_mod.write_file_atomic(os.path.join(staging, "disks", "vda.qcow2"), data)
    assert repo.set_ids(VM) == []
    assert repo.all_ids(VM) == [set_id]
    assert repo.leftovers(VM) == [staging]
    manifest = _manifest.build_manifest(
        set_id=set_id,
        vm_uuid=VM,
        vm_name="web-01",
        host="hv1",
        started=dt.datetime(2026, 11, 25, 7, 35, 12, tzinfo=dt.timezone.utc),
        completed=dt.datetime(2026, 11, 25, 7, 36, 0, tzinfo=dt.timezone.utc),
        set_type="copy",
        chain_id=None,
        parent=None,
        checkpoint=None,
        consistency="crash",
        period=None,
        disks=[{"target": "vda", "method": "copy", "file": "disks/vda.qcow2", "virtual_size": 1 << 20, "size": len(data)}],
        skipped_disks=[],
        files={"disks/vda.qcow2": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
        tool={},
        stats={},
    )
    final = repo.commit(VM, set_id, staging, manifest)
    assert final == repo.set_dir(VM, set_id)
    assert not os.path.exists(staging)
    assert repo.leftovers(VM) == []
    assert repo.set_ids(VM) == [set_id]
    assert _mode(final) == 0o700
    assert _mode(os.path.join(final, "disks")) == 0o700
    assert _mode(os.path.join(final, "disks", "vda.qcow2")) == 0o400
    assert _mode(os.path.join(final, _manifest.MANIFEST_NAME)) == 0o400
    loaded, sha = repo.read_manifest(VM, set_id)
    assert loaded == manifest
    assert sha == hashlib.sha256(_manifest.dumps(manifest)).hexdigest()
    _raises("SET_NOT_FOUND", repo.read_manifest, VM, "20261125T073512Z-002")


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, None),
        (b'{"outcome": "ok"}', {"outcome": "ok"}),
        (b"{broken", {"outcome": "unreadable"}),
        (b"[1]", {"outcome": "unreadable"}),
    ],
)
def test_read_verify_sidecar(base, content, expected):
    repo = repo_mod.Repository(os.path.join(base, "repo"))
    repo.initialise()
    repo.prepare_vm(VM)
    if content is not None:
        with open(os.path.join(repo.sets_dir(VM), "20261125T073512Z-001.verify.json"), "wb") as fh:
            fh.write(content)
    assert repo.read_verify_sidecar(VM, "20261125T073512Z-001") == expected


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    "data, mode",
    [
        pytest.param(b"", 0o600, id="empty"),
        pytest.param(b"hello\n", 0o600, id="private"),
        pytest.param(b"read only", 0o400, id="read-only"),
        pytest.param(b"shared marker", 0o644, id="world-readable"),
        pytest.param(bytes(range(256)) * 4096, 0o600, id="1MiB"),
    ],
)
def test_write_file_atomic(base, umask_022, data, mode):
    path = os.path.join(base, "file.json")
    repo_mod.write_file_atomic(path, data, mode)
    with open(path, "rb") as fh:
        assert fh.read() == data
    assert _mode(path) == mode
    assert os.listdir(base) == ["file.json"], "no temporary file may be left behind"


def test_write_file_atomic_default_mode(base, umask_022):
    path = os.path.join(base, "f")
    repo_mod.write_file_atomic(path, b"x")
    assert _mode(path) == 0o600


def test_write_file_atomic_replaces_by_rename(base):
    path = os.path.join(base, "manifest.json")
    with open(path, "wb") as fh:
        fh.write(b"old content that is longer than the new one")
    os.link(path, os.path.join(base, "old-link"))
    repo_mod.write_file_atomic(path, b"new")
    with open(path, "rb") as fh:
        assert fh.read() == b"new"
    # The old inode was never written to: a reader holding it saw a whole file, never a half one.
    with open(os.path.join(base, "old-link"), "rb") as fh:
        assert fh.read() == b"old content that is longer than the new one"
    assert sorted(os.listdir(base)) == ["manifest.json", "old-link"]


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 128, 1000])
def test_sha256_file_chunk_boundaries(base, monkeypatch, size):
    monkeypatch.setattr(repo_mod, "_HASH_CHUNK", 64)
    data = random.Random(size).randbytes(size)
    path = os.path.join(base, "blob")
    with open(path, "wb") as fh:
        fh.write(data)
    assert repo_mod.sha256_file(path) == (hashlib.sha256(data).hexdigest(), size)


def test_sha256_file_real_chunk_size(base):
    data = random.Random(1).randbytes(repo_mod._HASH_CHUNK + 17)
    path = os.path.join(base, "blob")
    with open(path, "wb") as fh:
        fh.write(data)
    assert repo_mod.sha256_file(path) == (hashlib.sha256(data).hexdigest(), len(data))


def test_sha256_file_missing_raises_oserror(base):
    with pytest.raises(FileNotFoundError):
        repo_mod.sha256_file(os.path.join(base, "missing"))


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o700, 0o400, 0o711, 0o000])
def test_makedir_exact_mode(base, mode):
    old = os.umask(0o077)
    try:
        path = os.path.join(base, "d")
        assert repo_mod.makedir(path, mode) is True
        assert _mode(path) == mode
        os.chmod(path, 0o755)
        assert repo_mod.makedir(path, mode) is False
        assert _mode(path) == mode
    finally:
        os.umask(old)
        os.chmod(os.path.join(base, "d"), 0o700)


def _read_only_tree(root: str) -> None:
    """A committed-looking set: 0400 files, and directories made read-only (0500) bottom-up."""
    os.makedirs(os.path.join(root, "disks"))
    os.makedirs(os.path.join(root, "sub", "deeper"))
    for rel in ("manifest.json", "disks/vda.qcow2", "sub/deeper/f"):
        with open(os.path.join(root, rel), "wb") as fh:
            fh.write(b"x")
        os.chmod(os.path.join(root, rel), 0o400)
    for rel in ("sub/deeper", "sub", "disks", ""):
        os.chmod(os.path.join(root, rel), 0o500)


def test_read_only_tree_defeats_plain_rmtree(base, owner_write_semantics):
    """Control for the next test: without remove_tree's recovery, such a tree cannot be removed."""
    root = os.path.join(base, "set")
    _read_only_tree(root)
    with pytest.raises(PermissionError):
        shutil.rmtree(root)
    assert os.path.isdir(root)


def test_remove_tree_read_only(base, owner_write_semantics):
    root = os.path.join(base, "set")
    _read_only_tree(root)
    with open(os.path.join(base, "sibling"), "wb") as fh:
        fh.write(b"keep")
    repo_mod.remove_tree(root)
    assert os.listdir(base) == ["sibling"]


def test_remove_tree_symlink_removes_only_the_link(base):
    target = os.path.join(base, "target")
    os.makedirs(os.path.join(target, "inner"))
    os.symlink(target, os.path.join(base, "link"))
    repo_mod.remove_tree(os.path.join(base, "link"))
    assert not os.path.lexists(os.path.join(base, "link"))
    assert os.path.isdir(os.path.join(target, "inner"))


def test_remove_tree_plain_file(base):
    path = os.path.join(base, "f")
    with open(path, "wb") as fh:
        fh.write(b"x")
    os.chmod(path, 0o400)
    repo_mod.remove_tree(path)
    assert os.listdir(base) == []


def test_remove_leftovers(base, owner_write_semantics):
    repo = repo_mod.Repository(os.path.join(base, "repo"))
    repo.initialise()
    repo.prepare_vm(VM)
    first = repo.create_staging(VM, "20261125T073512Z-001")
    _read_only_tree(os.path.join(repo.staging_root(VM), "20261125T073512Z-002"))
    with open(os.path.join(first, "disks", "vda.qcow2"), "wb") as fh:
        fh.write(b"partial")
    removed = repo.remove_leftovers(VM)
    assert removed == [first, os.path.join(repo.staging_root(VM), "20261125T073512Z-002")]
    assert os.listdir(repo.staging_root(VM)) == []
    assert repo.remove_leftovers(VM) == []


# --------------------------------------------------------------------------- qemu_can_traverse


def _others_can_traverse(path: str) -> bool:
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return False
    return True


@pytest.fixture
def open_base():
    """A directory every ancestor of which others can traverse (pytest's tmp_path is 0700)."""
    path = os.path.realpath(tempfile.mkdtemp(prefix="vmbackup-unit-"))
    os.chmod(path, 0o711)
    if not _others_can_traverse(path):
        shutil.rmtree(path)
        pytest.skip(f"the temporary directory {path} is not traversable by others on this host")
    yield path
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
    shutil.rmtree(path)


@pytest.mark.parametrize(
    "modes, path, blocked",
    [
        pytest.param({"a": 0o711, "a/b": 0o711, "a/b/c": 0o711}, "a/b/c", None, id="all-traversable"),
        pytest.param({"a": 0o701, "a/b": 0o755}, "a/b", None, id="only-o+x-is-needed"),
        pytest.param({"a": 0o700, "a/b": 0o711}, "a/b", "a", id="first-blocked"),
        pytest.param({"a": 0o711, "a/b": 0o700, "a/b/c": 0o700}, "a/b/c", "a/b", id="first-of-two-blocked"),
        pytest.param({"a": 0o711, "a/b": 0o750}, "a/b", "a/b", id="group-x-is-not-enough"),
        pytest.param({"a": 0o711, "a/b": 0o744}, "a/b", "a/b", id="o+r-without-o+x"),
        pytest.param({"a": 0o711}, "a/missing/deeper", None, id="missing-tail-will-be-created"),
        pytest.param({"a": 0o700}, "a/missing", "a", id="missing-tail-under-blocked"),
    ],
)
def test_qemu_can_traverse(open_base, modes, path, blocked):
    for rel in sorted(modes):
        os.mkdir(os.path.join(open_base, rel))
    for rel in sorted(modes, reverse=True):
        os.chmod(os.path.join(open_base, rel), modes[rel])
    expected = os.path.join(open_base, blocked) if blocked else None
    assert repo_mod.qemu_can_traverse(os.path.join(open_base, path)) == expected


def test_qemu_can_traverse_reports_pytest_tmp_path(tmp_path):
    # pytest makes its base temporary directory 0700, so a repository below it is out of QEMU's reach.
    path = os.path.realpath(tmp_path)
    blocked = repo_mod.qemu_can_traverse(os.path.join(path, "repo"))
    if _others_can_traverse(path):
        assert blocked is None
    else:
        assert blocked is not None
        assert path.startswith(blocked)
        assert not os.stat(blocked).st_mode & stat.S_IXOTH


# --------------------------------------------------------------------------- trust: who may influence what root does

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _victim(base: str) -> tuple[str, tuple]:
    """A file outside the repository that an attacker wants root to truncate or chmod."""
    path = os.path.join(base, "victim")
    with open(path, "wb") as fh:
        fh.write(b"precious data\n")
    os.chmod(path, 0o644)
    return path, _state(path)


def _state(path: str) -> tuple:
    st = os.lstat(path)
    with open(path, "rb") as fh:
        return stat.S_IMODE(st.st_mode), st.st_size, hashlib.sha256(fh.read()).hexdigest(), st.st_nlink


def _victim_dir(base: str) -> str:
    path = os.path.join(base, "victim-dir")
    os.makedirs(os.path.join(path, "inner"))
    with open(os.path.join(path, "inner", "keep"), "wb") as fh:
        fh.write(b"keep")
    os.chmod(path, 0o755)
    return path


def _dir_state(path: str) -> list[tuple]:
    out = []
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            p = os.path.join(root, name)
            out.append((os.path.relpath(p, path), stat.S_IMODE(os.lstat(p).st_mode), os.lstat(p).st_size))
    return [(".", stat.S_IMODE(os.lstat(path).st_mode), 0)] + out


@pytest.fixture
def repo(base) -> repo_mod.Repository:
    repo = repo_mod.Repository(os.path.join(base, "repo"))
    repo.initialise()
    repo.prepare_vm(VM)
    return repo


@needs_root
@pytest.mark.parametrize("relative", ["repo", "repo/sub", "a/repo"])
def test_check_trusted_path_refuses_a_directory_owned_by_another_user(base, relative):
    owned = os.path.join(base, relative.split("/")[0])
    os.makedirs(os.path.join(base, relative))
    os.chown(owned, NOBODY, NOBODY)
    for allow in (False, True):  # allow_unsafe_permissions never excuses another owner
        err = _raises("UNSAFE_TARGET", repo_mod.check_trusted_path, os.path.join(base, relative), "repository", allow)
        assert f"{owned} is owned by uid {NOBODY}" in err.msg
        assert err.details["unsafe_path"] == owned


@needs_root
def test_check_trusted_path_refuses_a_missing_repository_below_another_users_directory(base):
    os.chown(base, NOBODY, NOBODY)
    try:
        _raises("UNSAFE_TARGET", repo_mod.check_trusted_path, os.path.join(base, "new", "repo"), "repository")
    finally:
        os.chown(base, 0, 0)


@pytest.mark.parametrize("allow", [False, True])
def test_check_trusted_path_refuses_a_symlink_anywhere(base, allow):
    os.makedirs(os.path.join(base, "real", "repo"))
    os.symlink(os.path.join(base, "real"), os.path.join(base, "link"))
    os.symlink(os.path.join(base, "real", "repo"), os.path.join(base, "repo-link"))
    for path, link in ((os.path.join(base, "link", "repo"), os.path.join(base, "link")),
                       (os.path.join(base, "repo-link"), os.path.join(base, "repo-link")),
                       (os.path.join(base, "link", "missing", "repo"), os.path.join(base, "link"))):
        err = _raises("UNSAFE_TARGET", repo_mod.check_trusted_path, path, "repository", allow)
        assert f"{link} is a symbolic link" in err.msg


@pytest.mark.parametrize(
    "parent_mode, repo_mode, allowed",
    [
        pytest.param(0o755, 0o711, True, id="plain"),
        pytest.param(0o1777, 0o711, True, id="sticky-world-writable-parent"),
        pytest.param(0o777, 0o711, False, id="world-writable-parent-without-sticky"),
        pytest.param(0o775, 0o711, False, id="group-writable-parent"),
        pytest.param(0o1770, 0o711, True, id="sticky-group-writable-parent"),
        pytest.param(0o755, 0o1777, False, id="sticky-repository-itself"),
        pytest.param(0o755, 0o771, False, id="group-writable-repository"),
    ],
)
def test_check_trusted_path_write_permissions(base, parent_mode, repo_mode, allowed):
    parent = os.path.join(base, "parent")
    path = os.path.join(parent, "repo")
    os.makedirs(path)
    os.chmod(path, repo_mode)
    os.chmod(parent, parent_mode)
    try:
        if allowed:
            repo_mod.check_trusted_path(path, "repository")
        else:
            err = _raises("UNSAFE_TARGET", repo_mod.check_trusted_path, path, "repository")
            assert "writable" in err.msg and "allow_unsafe_permissions" in err.msg
        repo_mod.check_trusted_path(path, "repository", allow_unsafe_permissions=True)  # mode rule only
    finally:
        os.chmod(parent, 0o755)


@needs_root
def test_check_trusted_path_sticky_parent_must_be_root_owned(base):
    parent = os.path.join(base, "parent")
    os.makedirs(os.path.join(parent, "repo"))
    os.chmod(parent, 0o1777)
    os.chown(parent, NOBODY, NOBODY)
    _raises("UNSAFE_TARGET", repo_mod.check_trusted_path, os.path.join(parent, "repo"), "repository")


def test_check_trusted_path_file_component(base):
    with open(os.path.join(base, "f"), "wb"):
        pass
    err = _raises("UNSAFE_TARGET", repo_mod.check_trusted_path, os.path.join(base, "f", "repo"), "repository")
    assert "is not a directory" in err.msg


def test_check_trusted_path_missing_tail_is_fine(base):
    repo_mod.check_trusted_path(os.path.join(base, "a", "b", "c"), "repository")
    assert os.listdir(base) == []


@needs_root
def test_inspect_and_open_refuse_a_repository_owned_by_nobody(base):
    path = os.path.join(base, "repo")
    repo_mod.Repository(path).initialise()
    os.chown(path, NOBODY, NOBODY)
    before = _dir_state(path)
    _raises("UNSAFE_TARGET", repo_mod.inspect_repository, path)
    _raises("UNSAFE_TARGET", repo_mod.open_repository, path)
    assert _dir_state(path) == before


def test_open_repository_not_found_and_format(base):
    err = _raises("REPOSITORY_NOT_FOUND", repo_mod.open_repository, os.path.join(base, "typo"))
    assert "does not exist" in err.msg and "mounted" in err.msg
    os.mkdir(os.path.join(base, "empty"))
    err = _raises("REPOSITORY_NOT_FOUND", repo_mod.open_repository, os.path.join(base, "empty"))
    assert "not a vmbackup repository" in err.msg and "matching collection" not in err.msg
    os.mkdir(os.path.join(base, "other"))
    with open(os.path.join(base, "other", "notes"), "w", encoding="utf-8") as fh:
        fh.write("x")
    _raises("REPOSITORY_NOT_FOUND", repo_mod.open_repository, os.path.join(base, "other"))
    os.mkdir(os.path.join(base, "v2"))
    with open(os.path.join(base, "v2", repo_mod.REPO_MARKER), "wb") as fh:
        fh.write(b'{"format": "vmbackup.libvirt/repository", "format_version": 2, "repo_id": "x"}')
    _raises("REPOSITORY_FORMAT", repo_mod.open_repository, os.path.join(base, "v2"))
    good = os.path.join(base, "good")
    repo_mod.Repository(good).initialise()
    assert repo_mod.open_repository(good).path == good


def test_marker_through_a_symlink_is_not_read(base):
    path = os.path.join(base, "repo")
    os.mkdir(path)
    real = os.path.join(base, "marker")
    with open(real, "wb") as fh:
        fh.write(b'{"format": "vmbackup.libvirt/repository", "format_version": 1, "repo_id": "x"}')
    os.symlink(real, os.path.join(path, repo_mod.REPO_MARKER))
    _raises("REPOSITORY_FORMAT", repo_mod.open_repository, path)


def test_initialise_creates_only_the_repository_itself(base):
    with pytest.raises(FileNotFoundError):
        repo_mod.Repository(os.path.join(base, "a", "repo")).initialise()
    assert os.listdir(base) == []


@needs_root
def test_initialise_refuses_an_existing_directory_of_another_user(base):
    path = os.path.join(base, "repo")
    os.mkdir(path, 0o755)
    os.chown(path, NOBODY, NOBODY)
    _raises("UNSAFE_TARGET", repo_mod.Repository(path).initialise)
    assert os.listdir(path) == [] and _mode(path) == 0o755


@needs_root
@pytest.mark.parametrize("component", ["vms", "vm", "sets", ".incomplete"])
def test_directories_inside_owned_by_another_user_are_refused(repo, component):
    path = {"vms": os.path.join(repo.path, "vms"), "vm": repo.vm_dir(VM), "sets": repo.sets_dir(VM),
            ".incomplete": repo.staging_root(VM)}[component]
    os.chown(path, NOBODY, NOBODY)
    mode = _mode(path)
    _raises("UNSAFE_TARGET", repo.prepare_vm, VM)
    if component != "sets":
        _raises("UNSAFE_TARGET", repo.create_staging, VM, "20261125T073512Z-001")
        _raises("UNSAFE_TARGET", repo.remove_leftovers, VM)
    if component != ".incomplete":
        _raises("UNSAFE_TARGET", repo.set_ids, VM)
    assert _mode(path) == mode


@pytest.mark.parametrize("component", [".incomplete", "sets", "vm"])
def test_a_repository_directory_replaced_by_a_symlink_is_refused(repo, base, component):
    victim = _victim_dir(base)
    before = _dir_state(victim)
    path = {"vm": repo.vm_dir(VM), "sets": repo.sets_dir(VM), ".incomplete": repo.staging_root(VM)}[component]
    shutil.rmtree(path)
    os.symlink(victim, path)
    for call in (lambda: repo.prepare_vm(VM), lambda: repo.remove_leftovers(VM),
                 lambda: repo.create_staging(VM, "20261125T073512Z-001"), lambda: repo.set_ids(VM),
                 lambda: repo.read_verify_sidecar(VM, "20261125T073512Z-001")):
        try:
            call()
        except VmBackupError as exc:
            assert exc.error_code == "UNSAFE_TARGET" and "symbolic link" in exc.msg
        except FileNotFoundError:
            pass  # a part below the link is missing: nothing was touched either
    assert _dir_state(victim) == before


def test_a_symlink_planted_in_the_staging_root_is_removed_not_followed(repo, base):
    victim = _victim_dir(base)
    before = _dir_state(victim)
    os.symlink(victim, os.path.join(repo.staging_root(VM), "20261125T073512Z-009"))
    os.symlink(victim, os.path.join(repo.staging_root(VM), "junk"))
    removed = repo.remove_leftovers(VM)
    assert len(removed) == 2 and os.listdir(repo.staging_root(VM)) == []
    assert _dir_state(victim) == before


def test_a_symlink_inside_a_leftover_is_removed_not_followed(repo, base):
    victim = _victim_dir(base)
    before = _dir_state(victim)
    staging = repo.create_staging(VM, "20261125T073512Z-001")
    os.symlink(victim, os.path.join(staging, "disks", "vda.qcow2"))
    os.symlink(os.path.join(victim, "inner", "keep"), os.path.join(staging, "nvram.fd"))
    repo.remove_leftovers(VM)
    assert _dir_state(victim) == before


def test_commit_refuses_a_symlink_in_the_staging_directory(repo, base):
    victim, before = _victim(base)
    staging = repo.create_staging(VM, "20261125T073512Z-001")
    os.symlink(victim, os.path.join(staging, "disks", "vda.qcow2"))
    err = _raises("UNSAFE_TARGET", repo.commit, VM, "20261125T073512Z-001", staging, {"set_id": "x"})
    assert "symbolic link" in err.msg
    assert _state(victim) == before
    assert repo.set_ids(VM) == []


def test_set_ids_ignore_links_and_read_manifest_does_not_follow_them(repo, base):
    elsewhere = os.path.join(base, "elsewhere", "20261125T073512Z-001")
    os.makedirs(elsewhere)
    with open(os.path.join(elsewhere, _manifest.MANIFEST_NAME), "wb") as fh:
        fh.write(b"{}")
    os.symlink(elsewhere, os.path.join(repo.sets_dir(VM), "20261125T073512Z-001"))
    os.mkdir(os.path.join(repo.sets_dir(VM), "20261125T073512Z-002"))
    os.symlink(os.path.join(elsewhere, _manifest.MANIFEST_NAME),
               os.path.join(repo.sets_dir(VM), "20261125T073512Z-002", _manifest.MANIFEST_NAME))
    assert repo.set_ids(VM) == []
    _raises("UNSAFE_TARGET", repo.read_manifest_bytes, VM, "20261125T073512Z-001")
    _raises("SET_NOT_FOUND", repo.read_manifest_bytes, VM, "20261125T073512Z-002")


def test_sidecar_through_a_symlink_is_unreadable(repo, base):
    victim, _before = _victim(base)
    os.symlink(victim, os.path.join(repo.sets_dir(VM), "20261125T073512Z-001.verify.json"))
    assert repo.read_verify_sidecar(VM, "20261125T073512Z-001") == {"outcome": "unreadable"}


def test_makedir_does_not_chmod_through_a_symlink(base):
    victim = _victim_dir(base)
    before = _dir_state(victim)
    os.symlink(victim, os.path.join(base, "d"))
    _raises("UNSAFE_TARGET", repo_mod.makedir, os.path.join(base, "d"), 0o700)
    assert _dir_state(victim) == before


@pytest.mark.parametrize("planted", ["name", "tmp"])
def test_write_file_atomic_never_writes_through_a_link(base, planted):
    victim, before = _victim(base)
    path = os.path.join(base, "run.json")
    os.symlink(victim, path if planted == "name" else f"{path}.tmp-{os.getpid()}")
    repo_mod.write_file_atomic(path, b"new")
    assert _state(victim) == before
    assert not os.path.islink(path)
    with open(path, "rb") as fh:
        assert fh.read() == b"new"
    assert sorted(os.listdir(base)) == ["run.json", "victim"]


def test_write_file_atomic_refuses_a_symlinked_directory(base):
    victim = _victim_dir(base)
    os.symlink(victim, os.path.join(base, "staging"))
    _raises("UNSAFE_TARGET", repo_mod.write_file_atomic, os.path.join(base, "staging", "run.json"), b"x")
    assert os.listdir(victim) == ["inner"]


def test_remove_tree_does_not_follow_a_symlinked_parent(base):
    victim = _victim_dir(base)
    before = _dir_state(victim)
    os.symlink(victim, os.path.join(base, "link"))
    _raises("UNSAFE_TARGET", repo_mod.remove_tree, os.path.join(base, "link", "inner"))
    assert _dir_state(victim) == before


# --------------------------------------------------------------------------- required_mount


def test_required_mount_none_checks_nothing(base):
    repo_mod.check_required_mount(os.path.join(base, "repo"), None)


def test_required_mount_must_contain_the_repository(base):
    err = _raises("REPOSITORY_NOT_MOUNTED", repo_mod.check_required_mount, os.path.join(base, "repo"), "/mnt/backup")
    assert "not below" in err.msg
    # A name that only starts like the mount point is not below it.
    _raises("REPOSITORY_NOT_MOUNTED", repo_mod.check_required_mount, "/mnt/backup2/repo", "/mnt/backup")


def test_required_mount_that_is_not_mounted(base):
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    err = _raises("REPOSITORY_NOT_MOUNTED", repo_mod.check_required_mount, os.path.join(mnt, "repo"), mnt + "/")
    assert "not a mount point" in err.msg


@pytest.mark.skipif(not os.path.ismount("/dev/shm"), reason="needs /dev/shm mounted")
def test_required_mount_same_file_system():
    repo_mod.check_required_mount("/dev/shm/vmbackup-unit/repo", "/dev/shm")
    if os.stat("/dev/shm").st_dev != os.stat("/").st_dev:
        err = _raises("REPOSITORY_NOT_MOUNTED", repo_mod.check_required_mount, "/dev/shm/vmbackup-unit/repo", "/")
        assert "another file system" in err.msg


def test_required_mount_relative_is_invalid():
    _raises("INVALID_ARGUMENT", repo_mod.check_required_mount, "/srv/repo", "srv")


# --------------------------------------------------------------------------- fstab: a mount point that should be mounted


def _files(base, fstab: str, mounted: list[str]) -> tuple[str, str]:
    fstab_path, info_path = os.path.join(base, "fstab"), os.path.join(base, "mountinfo")
    with open(fstab_path, "w", encoding="utf-8") as fh:
        fh.write(fstab)
    with open(info_path, "w", encoding="utf-8") as fh:
        for i, where in enumerate(["/"] + mounted):
            fh.write(f"{20 + i} 1 0:{30 + i} / {where.replace(' ', chr(92) + '040')} rw,relatime - ext4 /dev/x rw\n")
    return fstab_path, info_path


FSTAB = """# /etc/fstab
UUID=1234 / ext4 defaults 0 1
/dev/vdb1 none swap sw 0 0
nfs:/export/backup /mnt/backup nfs4 defaults,_netdev 0 0
//srv/share /mnt/with\\040space cifs noauto 0 0
"""


@pytest.mark.parametrize(
    "path, mounted, refused",
    [
        pytest.param("/mnt/backup/vmbackup", [], "/mnt/backup", id="below-an-unmounted-share"),
        pytest.param("/mnt/backup", [], "/mnt/backup", id="the-unmounted-mount-point-itself"),
        pytest.param("/mnt/backup/vmbackup", ["/mnt/backup"], None, id="mounted"),
        pytest.param("/mnt/backup2/vmbackup", [], None, id="a-name-that-only-starts-alike"),
        pytest.param("/srv/vmbackup", [], None, id="not-below-any-entry"),
        pytest.param("/mnt/with space/repo", [], "/mnt/with space", id="escaped-space"),
        pytest.param("/mnt/with space/repo", ["/mnt/with space"], None, id="escaped-space-mounted"),
    ],
)
def test_check_expected_mounts(base, path, mounted, refused):
    fstab, info = _files(base, FSTAB, mounted)
    if refused is None:
        repo_mod.check_expected_mounts(path, fstab, info)
    else:
        err = _raises("REPOSITORY_NOT_MOUNTED", repo_mod.check_expected_mounts, path, fstab, info)
        assert f"below {refused}," in err.msg and "not mounted" in err.msg
        assert err.details["required_mount"] == refused


def test_check_expected_mounts_without_fstab(base):
    repo_mod.check_expected_mounts("/mnt/backup/repo", os.path.join(base, "missing"), os.path.join(base, "missing"))


def test_is_mount_point_sees_bind_mounts_in_mountinfo(base):
    _fstab, info = _files(base, "", ["/srv/bound"])
    assert repo_mod.is_mount_point("/srv/bound", info)
    assert repo_mod.is_mount_point("/", info)
    assert not repo_mod.is_mount_point(base, info)


def test_read_set_and_staging_files_never_follow_a_link(repo, base):
    victim, before = _victim(base)
    staging = repo.create_staging(VM, "20261125T073512Z-001")
    repo_mod.write_file_atomic(os.path.join(staging, "run.json"), b'{"checkpoint": null}')
    assert repo.read_staging_file(VM, "20261125T073512Z-001", "run.json") == b'{"checkpoint": null}'
    os.unlink(os.path.join(staging, "run.json"))
    os.symlink(victim, os.path.join(staging, "run.json"))
    with pytest.raises(OSError):
        repo.read_staging_file(VM, "20261125T073512Z-001", "run.json")
    _raises("PATH_ESCAPE", repo.read_staging_file, VM, "..", "run.json")
    os.makedirs(os.path.join(repo.set_dir(VM, "20261125T073512Z-002")))
    os.symlink(victim, os.path.join(repo.set_dir(VM, "20261125T073512Z-002"), "checkpoint.xml"))
    with pytest.raises(OSError):
        repo.read_set_file(VM, "20261125T073512Z-002", "checkpoint.xml")
    _raises("PATH_ESCAPE", repo.read_set_file, VM, "20261125T073512Z-002", "../x")
    assert _state(victim) == before


# --------------------------------------------------------------------------- copying host files without following links
def test_copy_regular_at_copies_a_regular_file_private(tmp_path):
    (tmp_path / "src").write_bytes(b"nvram" * 1000)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert repo_mod.copy_regular_at(fd, "src", str(tmp_path / "dst")) is True
    finally:
        os.close(fd)
    assert (tmp_path / "dst").read_bytes() == b"nvram" * 1000
    assert _mode(str(tmp_path / "dst")) == 0o600


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_copy_regular_at_refuses_links_and_special_files(tmp_path, kind):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    if kind == "symlink":
        os.symlink(secret, tmp_path / "src")
    elif kind == "fifo":
        os.mkfifo(tmp_path / "src")
    else:
        (tmp_path / "src").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert repo_mod.copy_regular_at(fd, "src", str(tmp_path / "dst")) is False
    finally:
        os.close(fd)
    assert not os.path.lexists(tmp_path / "dst")


def test_copy_regular_at_never_writes_through_an_existing_destination(tmp_path):
    (tmp_path / "src").write_bytes(b"data")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / "dst")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            repo_mod.copy_regular_at(fd, "src", str(tmp_path / "dst"))
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"keep"


# --------------------------------------------------------------------------- pull mode: run directories, private repositories
@pytest.fixture
def scratch_parent(tmp_path):
    """A parent owned by another user (as libvirt's /var/lib/libvirt/qemu is libvirt-qemu's)."""
    parent = tmp_path / "qemu"
    parent.mkdir(mode=0o750)
    os.chown(parent, 64055, 64055)
    return parent


def test_run_directory_lifecycle(scratch_parent):
    scratch = str(scratch_parent / "vmbackup")
    name = repo_mod.run_dir_name("20261201T090000Z-001", 4242)
    path = repo_mod.create_run_dir(scratch, VM, name, 64055, 107)
    assert path == os.path.join(scratch, VM, name)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (64055, 107, 0o700)
    for top in (scratch, os.path.join(scratch, VM)):
        st = os.stat(top)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711)
    with pytest.raises(FileExistsError):
        repo_mod.create_run_dir(scratch, VM, name, 64055, 107)
    open(os.path.join(path, "vda.scratch"), "wb").close()
    assert repo_mod.list_run_dirs(scratch, VM) == [(name, "20261201T090000Z-001", 4242)]
    assert repo_mod.split_run_dir(path, VM) == (scratch, name)
    assert repo_mod.remove_run_dir(scratch, VM, name) is True
    assert not os.path.exists(path) and repo_mod.remove_run_dir(scratch, VM, name) is False
    assert repo_mod.list_run_dirs(scratch, VM) == [] and repo_mod.list_run_dirs(scratch, "other") == []
    assert repo_mod.list_run_dirs(str(scratch_parent / "missing"), VM) == []


def test_run_directory_is_never_reached_through_a_link(scratch_parent, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, scratch_parent / "vmbackup")
    _raises("UNSAFE_TARGET", repo_mod.create_run_dir, str(scratch_parent / "vmbackup"), VM,
            repo_mod.run_dir_name("20261201T090000Z-001", 1), 0, 0)
    assert os.listdir(elsewhere) == []
    # A scratch_dir that another user owns (QEMU's user could swap what root removes) is refused.
    os.unlink(scratch_parent / "vmbackup")
    (scratch_parent / "vmbackup").mkdir()
    os.chown(scratch_parent / "vmbackup", 64055, 64055)
    _raises("UNSAFE_TARGET", repo_mod.list_run_dirs, str(scratch_parent / "vmbackup"), VM)


@pytest.mark.parametrize("path", [
    None, "relative/x", f"/s/{VM}/20261201T090000Z-001", f"/s/{VM}/20261201T090000Z-001.0", "/s/other/20261201T090000Z-001.5",
    f"/s/{VM}/../{VM}/20261201T090000Z-001.5", f"/{VM}/20261201T090000Z-001.5", f"/s/{VM}/20261201T090000Z-001.5/x",
])
def test_split_run_dir_refuses_anything_but_a_run_directory(path):
    assert repo_mod.split_run_dir(path, VM) is None


def test_remove_run_dir_refuses_other_names(tmp_path):
    _raises("PATH_ESCAPE", repo_mod.remove_run_dir, str(tmp_path), VM, "..")
    _raises("PATH_ESCAPE", repo_mod.create_run_dir, str(tmp_path), VM, "a/b", 0, 0)


@pytest.mark.parametrize("path", ["", "relative", "/", "//", None, "/a\x00b"])
def test_validate_scratch_dir(path):
    _raises("INVALID_ARGUMENT", repo_mod.validate_scratch_dir, path)


def test_private_repository_creates_nothing_others_can_reach(tmp_path):
    path = str(tmp_path / "repo")
    os.chmod(tmp_path, 0o700)
    repo = repo_mod.Repository(path, private=True)
    assert repo.initialise()
    repo.prepare_vm(VM)
    staging = repo.create_staging(VM, "20261201T090000Z-001")
    for sub in ("", "vms", f"vms/{VM}", f"vms/{VM}/.incomplete", f"vms/{VM}/sets", staging, os.path.join(staging, "disks")):
        assert _mode(os.path.join(path, sub)) == 0o700, sub
    assert _mode(os.path.join(path, repo_mod.REPO_MARKER)) == 0o600
    # An existing repository keeps its modes (a push-mode repository stays usable by push runs).
    os.chmod(os.path.join(path, "vms"), 0o711)
    repo.initialise()
    assert _mode(os.path.join(path, "vms")) == 0o711
    # A push-mode Repository makes the way to its staging directories traversable, as before.
    push = repo_mod.Repository(path)
    push.prepare_vm(VM)
    assert _mode(os.path.join(path, "vms", VM, ".incomplete")) == 0o711


@pytest.fixture
def open_tmp():
    """A directory whose parents everybody may traverse (pytest's tmp_path is under a 0700 one)."""
    path = tempfile.mkdtemp(dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_blocked_for_follows_owner_group_and_other_bits(open_tmp):
    import pathlib  # pylint: disable=import-outside-toplevel
    top = pathlib.Path(open_tmp) / "top"
    (top / "sub").mkdir(parents=True)
    os.chown(top, 64055, 107)
    os.chmod(top, 0o710)  # the owner and the group may traverse, others not
    assert repo_mod.blocked_for(str(top / "sub" / "missing"), 64055, 5) is None
    assert repo_mod.blocked_for(str(top / "sub"), 1234, 107) is None
    assert repo_mod.blocked_for(str(top / "sub"), 1234, 1234) == str(top)
    assert repo_mod.blocked_for(str(top / "sub"), 0, 0) is None
