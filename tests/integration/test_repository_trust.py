"""Who may influence what root does in a repository, and when a repository may be created.

Issue 8, items 1, 2 (repository side) and 14, on the real thing: the modules run as root through
the `ansible` CLI; the attacker is a real unprivileged process (`nobody`, through setpriv); results
are checked by stat/hash of the files themselves (harness.tree_state), never by the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import stat
import subprocess
import threading

import libvirt
import pytest

from harness import DiskSpec, destroy_vm, parse_disk_sources, parse_result, tree_state

NOBODY = 65534


def as_nobody(script: str, **env: str) -> None:
    """Run a shell script as an unprivileged local user, as an attacker would."""
    proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-euc", script],
                          env=dict(os.environ, **env), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def victims(repo_root) -> pathlib.Path:
    """Root's files outside the repository that an attacker would like root to truncate, chmod or delete."""
    path = repo_root / "victims"
    path.mkdir(mode=0o755)
    (path / "file").write_bytes(b"precious root data\n" * 100)
    os.chmod(path / "file", 0o644)
    (path / "dir").mkdir(mode=0o755)
    (path / "dir" / "keep").write_bytes(b"keep me\n")
    (path / "dir" / "sub").mkdir(mode=0o750)
    (path / "dir" / "sub" / "deeper").write_bytes(b"me too\n")
    os.chmod(path / "dir", 0o755)
    return path


def first_export(ansible, vms, repo, **extra):
    vm = vms.create([DiskSpec("16M", fill=[(0x71, "0", "1M")])])
    result = ansible("export", dict({"name": vm.name, "repository": str(repo)}, **extra))
    assert result["changed"] and not result["failed"], result
    return vm, result


# --------------------------------------------------------------------------- item 1: trust


def _remove_domain(conn, name: str) -> None:
    """A domain a broken build defined (the old code restored from an untrusted repository)."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    sources = parse_disk_sources(dom.XMLDesc(0))
    destroy_vm(dom)
    for path in sources.values():
        if path and os.path.basename(path).startswith(name):
            with contextlib.suppress(OSError):
                os.unlink(path)


def test_repository_owned_by_another_user_is_refused_by_every_module(ansible, conn, vms, repo, victims):
    vm, first = first_export(ansible, vms, repo)
    # The repository belongs to nobody (a misconfigured share, a user's directory). That user
    # swaps vms/ for a tree of their own whose lock and .incomplete point at root's files.
    os.chown(repo, NOBODY, NOBODY)
    as_nobody(
        'cd "$REPO" && mv vms vms.old && mkdir -p "vms/$VM" && ln -s "$VICTIMS/file" "vms/$VM/lock" '
        '&& ln -s "$VICTIMS/dir" "vms/$VM/.incomplete" && ln -s "$VICTIMS/dir" "vms/$VM/sets"',
        REPO=str(repo), VM=vm.uuid, VICTIMS=str(victims))
    before, repo_before = tree_state(victims), tree_state(repo)

    try:
        runs = {
            "export": ansible("export", {"name": vm.name, "repository": str(repo)}),
            "export-check": ansible("export", {"name": vm.name, "repository": str(repo)}, check=True),
            "verify": ansible("verify", {"repository": str(repo), "uuid": vm.uuid}),
            "restore": ansible("restore", {"repository": str(repo), "uuid": vm.uuid, "restore_as": vm.name + "-r"}),
        }
    finally:
        _remove_domain(conn, vm.name + "-r")
    assert tree_state(victims) == before, "root followed a link planted by another user"
    assert (victims / "file").read_bytes() == b"precious root data\n" * 100
    assert tree_state(repo) == repo_before
    for what, result in runs.items():
        assert result["failed"] and result["error_code"] == "UNSAFE_TARGET", (what, result)
        assert f"owned by uid {NOBODY}" in result["msg"], (what, result)
        assert result["unsafe_path"] == str(repo)


def test_a_parent_owned_by_another_user_is_refused(ansible, vms, repo_root):
    """The repository is root's, but the user owning the directory above could rename it away."""
    parent = repo_root / "users-dir"
    parent.mkdir(mode=0o711)
    (parent / "repo").mkdir(mode=0o711)
    os.chown(parent, NOBODY, NOBODY)
    vm = vms.create([DiskSpec("16M")])
    before = tree_state(parent)
    result = ansible("export", {"name": vm.name, "repository": str(parent / "repo")})
    assert tree_state(parent) == before
    assert result["failed"] and result["error_code"] == "UNSAFE_TARGET", result
    assert result["unsafe_path"] == str(parent)
    # Nor may a new repository be created there.
    result = ansible("export", {"name": vm.name, "repository": str(parent / "new"), "create_repository": True})
    assert result["failed"] and result["error_code"] == "UNSAFE_TARGET", result
    assert tree_state(parent) == before


@pytest.mark.parametrize("planted", ["lock", ".incomplete", "sets", "staging"])
def test_a_link_planted_in_a_writable_repository_is_never_followed(ansible, vms, repo, victims, planted):
    """allow_unsafe_permissions lets others write in the repository; even then nothing in it is
    followed: the planted link is refused (or, in the staging root, removed as a link)."""
    vm, first = first_export(ansible, vms, repo)
    vm_dir = repo / "vms" / vm.uuid
    for d in (repo, repo / "vms", vm_dir, vm_dir / ".incomplete"):
        os.chmod(d, 0o777)
    target = victims / ("file" if planted == "lock" else "dir")
    link = {"lock": vm_dir / "lock", ".incomplete": vm_dir / ".incomplete", "sets": vm_dir / "sets",
            "staging": vm_dir / ".incomplete" / "20260101T000000Z-001"}[planted]
    # The attacker moves the real entry aside (it may not delete root's) and puts a link in its place.
    as_nobody('if [ -e "$LINK" ]; then mv "$LINK" "$LINK.moved"; fi; ln -s "$TARGET" "$LINK"',
              LINK=str(link), TARGET=str(target))
    assert link.is_symlink()
    before = tree_state(victims)

    result = ansible("export", {"name": vm.name, "repository": str(repo), "allow_unsafe_permissions": True})
    assert tree_state(victims) == before, f"root followed the link planted as {planted}"
    if planted == "staging":
        # A leftover in the staging root is removed - the link itself, not what it points to.
        assert result["changed"] and not result["failed"], result
        assert str(link) in result["cleaned_up"][0] and not os.path.lexists(link)
    else:
        assert result["failed"] and result["error_code"] == "UNSAFE_TARGET", result
        assert "symbolic link" in result["msg"], result
        assert link.is_symlink()
    assert tree_state(victims) == before, f"root followed the link planted as {planted}"
    verify = ansible("verify", {"repository": str(repo), "uuid": vm.uuid, "allow_unsafe_permissions": True})
    if planted in ("sets", "lock"):
        assert verify["failed"] and verify["error_code"] == "UNSAFE_TARGET", verify
    assert tree_state(victims) == before


@pytest.mark.parametrize("mode, code", [(0o777, "UNSAFE_TARGET"), (0o1777, None), (0o775, "UNSAFE_TARGET")],
                         ids=["world-writable", "sticky", "group-writable"])
def test_a_parent_others_can_write_is_refused_unless_sticky(ansible, vms, repo_root, mode, code):
    parent = repo_root / "shared"
    parent.mkdir()
    (parent / "repo").mkdir(mode=0o711)
    os.chmod(parent, mode)
    vm = vms.create([DiskSpec("16M")])
    before = tree_state(parent)
    result = ansible("export", {"name": vm.name, "repository": str(parent / "repo")})
    if code is None:
        assert result["changed"] and not result["failed"], result
        assert stat.S_IMODE((parent / "repo").stat().st_mode) == 0o711
        created = ansible("export", {"name": vm.name, "repository": str(parent / "new"), "create_repository": True})
        assert created["changed"] and not created["failed"], created
    else:
        assert tree_state(parent) == before
        assert result["failed"] and result["error_code"] == code, result
        assert result["unsafe_path"] == str(parent)
        result = ansible("export", {"name": vm.name, "repository": str(parent / "new"), "create_repository": True})
        assert result["failed"] and result["error_code"] == code, result
        assert tree_state(parent) == before


# --------------------------------------------------------------------------- item 2: private while written


@pytest.mark.parametrize("running, transport", [(False, "auto"), (True, "auto"), (True, "push")],
                         ids=["shut-off-copy", "live-pull-backup", "live-push-backup"])
def test_backup_data_is_private_from_the_first_byte(ansible, vms, repo, running, transport):
    """Watch every file of the staging directory while qemu-img (a shut-off VM's copy, a pull-mode
    backup) or QEMU (a push-mode backup) writes it: none may ever be readable by group or others,
    and nothing is opened up later."""
    vm = vms.create([DiskSpec("1G", fill=[(0x5A, "0", "600M")])], running=running)
    incomplete = repo / "vms" / vm.uuid / ".incomplete"
    seen: dict[str, set[int]] = {}
    sizes: dict[str, set[int]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for dirpath, dirnames, filenames in os.walk(incomplete):
                for name in dirnames + filenames:
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:
                        continue
                    rel = os.path.relpath(path, incomplete).split("/", 1)[-1]
                    seen.setdefault(rel, set()).add(stat.S_IMODE(st.st_mode) | (stat.S_IFDIR if stat.S_ISDIR(st.st_mode) else 0))
                    if stat.S_ISREG(st.st_mode):
                        sizes.setdefault(rel, set()).add(st.st_size)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = ansible("export", {"name": vm.name, "repository": str(repo), "transport": transport})
    finally:
        stop.set()
        watcher.join(10)
    assert result["changed"] and result["type"] == ("full" if running else "copy"), result
    disk = "disks/vda.qcow2"
    assert disk in sizes and len(sizes[disk]) > 1, f"the copy was not observed while it was written: {sizes}"
    for rel, modes in sorted(seen.items()):
        for mode in modes:
            if mode & stat.S_IFDIR:
                # Push mode: staging directories are 0711 on purpose (QEMU writes its targets there; created
                # 0700 first), never listable; otherwise (pull mode, copies) nobody but root enters: 0700.
                assert mode & 0o077 in ((0o011, 0) if transport == "push" else (0,)), (rel, oct(mode))
            else:
                assert mode & 0o077 == 0, f"{rel} was mode {mode:04o} while it was written"
    # Committed: files 0400, directories 0700, nothing readable by others.
    set_dir = pathlib.Path(result["repository_path"])
    assert stat.S_IMODE(set_dir.stat().st_mode) == 0o700
    for path in set_dir.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o400
        assert stat.S_IMODE(path.lstat().st_mode) == expected, path
    sets = repo / "vms" / vm.uuid / "sets"
    assert stat.S_IMODE(sets.stat().st_mode) == 0o700
    # The repository existed (0711, kept); what the run created is 0711 for push mode, else 0700.
    assert stat.S_IMODE(repo.stat().st_mode) == 0o711
    for rel in ("vms", f"vms/{vm.uuid}", f"vms/{vm.uuid}/.incomplete"):
        assert stat.S_IMODE((repo / rel).stat().st_mode) == (0o711 if transport == "push" else 0o700), rel
    assert stat.S_IMODE((repo / "vms" / vm.uuid / "lock").stat().st_mode) == 0o600


# --------------------------------------------------------------------------- item 14: a repository only where one is meant to be


def test_a_missing_repository_is_created_only_when_asked(ansible, vms, repo_root):
    vm = vms.create([DiskSpec("16M", fill=[(0x72, "0", "1M")])])
    path = repo_root / "new-repo"
    before = tree_state(repo_root)
    for check in (True, False):
        refused = ansible("export", {"name": vm.name, "repository": str(path)}, check=check)
        assert refused["failed"] and refused["error_code"] == "REPOSITORY_NOT_FOUND", refused
        assert "create_repository" in refused["msg"]
    assert tree_state(repo_root) == before and vm.checkpoints() == []

    predicted = ansible("export", {"name": vm.name, "repository": str(path), "create_repository": True}, check=True)
    assert predicted["changed"] and not predicted["failed"] and not path.exists(), predicted
    created = ansible("export", {"name": vm.name, "repository": str(path), "create_repository": True})
    assert created["changed"] and not created["failed"], created
    # Created private (pull mode: QEMU never enters the repository).
    assert created["transport"] == "pull" and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((path / "vmbackup-repo.json").stat().st_mode) == 0o600
    assert json.loads((path / "vmbackup-repo.json").read_text())["format"] == "vmbackup.libvirt/repository"
    # An existing repository needs no option.
    again = ansible("export", {"name": vm.name, "repository": str(path)})
    assert again["changed"] and not again["failed"], again


def test_a_missing_parent_is_refused_even_with_create_repository(ansible, vms, repo_root):
    vm = vms.create([DiskSpec("16M")])
    before = tree_state(repo_root)
    result = ansible("export", {"name": vm.name, "repository": str(repo_root / "mnt" / "backup" / "repo"),
                                "create_repository": True})
    assert result["failed"] and result["error_code"] == "REPOSITORY_NOT_FOUND", result
    assert str(repo_root / "mnt" / "backup") in result["msg"]
    assert tree_state(repo_root) == before


def test_an_existing_empty_directory_is_initialised(ansible, vms, repo):
    assert os.listdir(repo) == []
    first_export(ansible, vms, repo)
    assert sorted(os.listdir(repo)) == ["vmbackup-repo.json", "vms"]


@pytest.mark.parametrize("path", ["missing", "empty", "other"])
def test_verify_and_restore_of_a_mistyped_repository_say_not_found(ansible, repo_root, path):
    target = repo_root / path
    if path != "missing":
        target.mkdir(mode=0o711)
    if path == "other":
        (target / "notes.txt").write_text("not a repository")
    before = tree_state(repo_root)
    for module, args in (("verify", {}), ("restore", {"name": "web01"})):
        result = ansible(module, dict(args, repository=str(target)))
        assert result["failed"] and result["error_code"] == "REPOSITORY_NOT_FOUND", (module, result)
        assert "mounted" in result["msg"] and "matching collection version" not in result["msg"], result
    assert tree_state(repo_root) == before


def test_required_mount_detects_an_unmounted_share(ansible, vms, repo_root):
    mnt = repo_root / "share"
    mnt.mkdir(mode=0o711)
    repo = mnt / "vmbackup"
    # Shut off: a running QEMU lives in its own mount namespace and would not see a mount made after it started.
    vm = vms.create([DiskSpec("16M", fill=[(0x73, "0", "1M")])], running=False)
    args = {"name": vm.name, "repository": str(repo), "required_mount": str(mnt)}

    # Not mounted: the mount point is an ordinary empty directory of the root file system.
    refused = ansible("export", dict(args, create_repository=True))
    assert refused["failed"] and refused["error_code"] == "REPOSITORY_NOT_MOUNTED", refused
    assert os.listdir(mnt) == []

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M,mode=0711", "tmpfs", str(mnt)], check=True)
    try:
        done = ansible("export", dict(args, create_repository=True))
        assert done["changed"] and not done["failed"], done["msg"]
        assert os.stat(repo).st_dev == os.stat(mnt).st_dev != os.stat(repo_root).st_dev
        assert not ansible("verify", {"repository": str(repo), "required_mount": str(mnt)})["failed"]
        # The repository must be below the mount point, on its file system.
        outside = ansible("verify", {"repository": str(repo), "required_mount": str(repo_root / "elsewhere")})
        assert outside["failed"] and outside["error_code"] == "REPOSITORY_NOT_MOUNTED", outside
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    # Unmounted again (the share went away): nothing is written underneath, by any module.
    before = tree_state(mnt)
    for module, extra in (("export", {"name": vm.name, "create_repository": True}), ("export", {"name": vm.name}),
                          ("verify", {}), ("restore", {"name": vm.name, "restore_as": vm.name + "-r"})):
        result = ansible(module, dict(extra, repository=str(repo), required_mount=str(mnt)))
        assert result["failed"] and result["error_code"] == "REPOSITORY_NOT_MOUNTED", (module, result)
        assert "not a mount point" in result["msg"]
    assert tree_state(mnt) == before == {".": before["."]}


def test_an_unmounted_fstab_share_is_refused_without_required_mount(ansible, vms, repo_root):
    """The classic accident: /etc/fstab mounts a share at the repository's place, the share is
    not mounted, and its empty mount point would become a repository on the root file system.
    The run sees its own /etc/fstab through a private mount namespace (the host's stays as it is)."""
    mnt = repo_root / "share"
    mnt.mkdir(mode=0o711)
    fstab = repo_root / "fstab"
    fstab.write_text(f"# test fstab\nUUID=0000 / ext4 defaults 0 1\nnfs.example:/backup {mnt} nfs4 defaults,_netdev 0 0\n")
    vm = vms.create([DiskSpec("16M", fill=[(0x74, "0", "1M")])], running=False)

    def in_namespace(module: str, args: dict) -> dict:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", 'mount --bind "$0" /etc/fstab; exec "$@"',
                str(fstab)] + ansible.argv(module, args)
        proc = subprocess.run(argv, env=ansible.env, capture_output=True, text=True, timeout=600, check=False)
        return parse_result(proc.stdout, proc.stderr)

    before = tree_state(mnt)
    for module, args in (("export", {"name": vm.name, "repository": str(mnt)}),  # the empty mount point itself
                         ("export", {"name": vm.name, "repository": str(mnt / "vmbackup"), "create_repository": True}),
                         ("verify", {"repository": str(mnt / "vmbackup")}),
                         ("restore", {"repository": str(mnt / "vmbackup"), "name": vm.name})):
        result = in_namespace(module, args)
        assert result["failed"] and result["error_code"] == "REPOSITORY_NOT_MOUNTED", (module, result)
        assert f"below {mnt}," in result["msg"] and "/etc/fstab" in result["msg"]
    assert tree_state(mnt) == before == {".": before["."]}

    # Mounted (in the run's namespace, as the fstab says), the same export works.
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
            'mount --bind "$0" /etc/fstab; mount -t tmpfs -o size=32M,mode=0711 tmpfs "$1"; shift; exec "$@"',
            str(fstab), str(mnt)] + ansible.argv("export", {"name": vm.name, "repository": str(mnt)})
    proc = subprocess.run(argv, env=ansible.env, capture_output=True, text=True, timeout=600, check=False)
    done = parse_result(proc.stdout, proc.stderr)
    assert done["changed"] and not done["failed"], done
    assert tree_state(mnt) == before, "the backup went to the namespace's tmpfs, not to the directory below it"


# ----------------------------------------------------------------------------- host files root copies into a set
def test_a_linked_nvram_file_is_not_followed_into_the_backup(ansible, conn, domain_type, repo, repo_root):
    """libvirt-qemu owns the NVRAM directory (a compromised QEMU can write there): if a VM's NVRAM
    file is replaced by a link to a root-only file, the backup must not carry that file's bytes
    (a restore would hand them to the new VM's QEMU)."""
    secret = repo_root / "secret"
    secret.write_bytes(b"root-only secret " + os.urandom(64).hex().encode())
    os.chmod(secret, 0o600)
    src = repo_root / "src"
    src.mkdir(mode=0o711)
    vda = src / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vda), "16M"], check=True)
    name = f"vmbt-nvlink-{os.urandom(4).hex()}"
    nvram = pathlib.Path("/var/lib/libvirt/qemu/nvram") / f"{name}_VARS.fd"
    os.symlink(secret, nvram)
    dom = conn.defineXML(
        f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type>"
        f"<loader readonly='yes' type='pflash'>/usr/share/qemu/bios-256k.bin</loader><nvram>{nvram}</nvram></os>"
        "<features><acpi/></features>"
        f"<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vda}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>")
    try:
        result = ansible("export", {"name": name, "repository": str(repo)})
        assert result["changed"] and not result["failed"], result
        set_dir = pathlib.Path(result["repository_path"])
        assert not (set_dir / "nvram.fd").exists()
        assert "nvram.fd" not in json.loads((set_dir / "manifest.json").read_text())["files"]
        leaked = [p for p in repo.rglob("*") if p.is_file() and secret.read_bytes() in p.read_bytes()]
        assert leaked == [], leaked
        assert os.path.islink(nvram) and secret.stat().st_mode & 0o777 == 0o600
    finally:
        destroy_vm(dom)
        if os.path.lexists(nvram):
            os.unlink(nvram)
