from __future__ import annotations

import os
import pathlib
import shutil
import uuid

import libvirt
import pytest

from harness import AnsibleRunner, VmFactory, build_and_install, pick_domain_type  # noqa: E402  (rootdir import)
from guest import GuestFactory, GuestImage, guest_image  # noqa: E402  (rootdir import)

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Repositories live where QEMU (libvirt-qemu) can traverse; pytest's tmp_path is 0700.
REPO_BASE = pathlib.Path("/var/tmp/vmbackup-tests")


@pytest.fixture(scope="session")
def conn():
    c = libvirt.open("qemu:///system")
    yield c
    c.close()


@pytest.fixture(scope="session")
def domain_type(conn) -> str:
    return pick_domain_type(conn)


@pytest.fixture(scope="session")
def ansible(tmp_path_factory) -> AnsibleRunner:
    workdir = tmp_path_factory.mktemp("collection")
    env = build_and_install(ROOT, workdir)
    import sys
    return AnsibleRunner(env=env, ansible=str(pathlib.Path(sys.executable).parent / "ansible"))


@pytest.fixture
def vms(conn, domain_type):
    factory = VmFactory(conn, domain_type)
    yield factory
    factory.cleanup()


@pytest.fixture
def repo_root():
    """A fresh directory for repositories; removed afterwards."""
    REPO_BASE.mkdir(mode=0o711, exist_ok=True)
    os.chmod(REPO_BASE, 0o711)
    path = REPO_BASE / uuid.uuid4().hex[:10]
    path.mkdir(mode=0o711)
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def repo(repo_root) -> pathlib.Path:
    """An existing empty directory (mode 0711) for a repository: export initialises it.
    (A missing one is created only with create_repository.)"""
    path = repo_root / "repo"
    path.mkdir(mode=0o711)
    os.chmod(path, 0o711)
    return path


@pytest.fixture
def scratch(repo_root) -> pathlib.Path:
    path = repo_root / "scratch"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_guest_image() -> GuestImage:
    """The tiny test guest's kernel, initrd and data-disk template (scripts/build-test-guest.sh,
    built once, cached across runs)."""
    return guest_image()


@pytest.fixture
def guests(conn, tiny_guest_image) -> GuestFactory:
    """Throwaway tiny guests (tests/integration/guest.py; docs/testing.md); all destroyed,
    undefined and removed afterwards."""
    factory = GuestFactory(conn)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def testbed(ansible, tiny_guest_image):
    """The multi-host test bed (scripts/testbed.sh, tests/integration/testbed.py; docs/testing.md):
    hv1..hv3 up once per session, torn down at the end only if this session brought it up.
    Tests leave it as they found it (libvirtd running, ssh unblocked, their domains and images
    gone, testbed.fresh_repo() for an empty shared repository)."""
    from testbed import Testbed  # noqa: E402  (rootdir import; only sessions that use the bed load it)
    bed = Testbed.session(env=ansible.env)
    yield bed
    bed.release()
