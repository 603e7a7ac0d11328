# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The shared argument specs in plugins/module_utils/_args.py match their doc fragments."""

from __future__ import annotations

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.module_utils.common.parameters import DEFAULT_TYPE_VALIDATORS

from ansible_collections.vmbackup.libvirt.plugins.doc_fragments import _connection as connection_fragment
from ansible_collections.vmbackup.libvirt.plugins.doc_fragments import _repository as repository_fragment
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _args

PAIRS = {
    "connection": (_args.CONNECTION_ARGSPEC, connection_fragment),
    "repository": (_args.REPOSITORY_ARGSPEC, repository_fragment),
}

# Keys whose meaning is the same in an argspec and in DOCUMENTATION options.
COMPARED_KEYS = ("type", "required", "default", "choices", "elements", "aliases", "no_log")
# What Ansible assumes when a key is absent (argspec and docs agree on these).
ABSENT = {"type": "str", "required": False, "default": None, "choices": None, "elements": None, "aliases": None, "no_log": False}


def _doc_options(fragment) -> dict:
    doc = yaml.safe_load(fragment.ModuleDocFragment.DOCUMENTATION)
    assert isinstance(doc, dict) and isinstance(doc.get("options"), dict), "fragment has no options mapping"
    return doc["options"]


def _converted_doc_default(option_type: str, value):
    """The doc default as the module would see it: YAML 60 for a float option is 60.0."""
    if value is None:
        return None
    return DEFAULT_TYPE_VALIDATORS[option_type](value)


def _cases():
    for name, (spec, fragment) in PAIRS.items():
        for option in sorted(set(spec) | set(_doc_options(fragment))):
            yield pytest.param(name, option, id=f"{name}-{option}")


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_same_options(name):
    spec, fragment = PAIRS[name]
    doc = _doc_options(fragment)
    assert sorted(spec) == sorted(doc), "options only in the argspec or only in the fragment"


@pytest.mark.parametrize("name, option", list(_cases()))
def test_option_matches(name, option):
    spec, fragment = PAIRS[name]
    doc = _doc_options(fragment)
    assert option in spec, f"{option} is documented in {fragment.__name__} but not in the argspec"
    assert option in doc, f"{option} is in the argspec but not documented in {fragment.__name__}"
    arg, docopt = spec[option], doc[option]
    unknown = set(arg) - set(COMPARED_KEYS)
    assert not unknown, f"argspec keys this test does not compare yet: {unknown}"
    for key in COMPARED_KEYS:
        arg_value = arg.get(key, ABSENT[key])
        doc_value = docopt.get(key, ABSENT[key])
        if key == "default":
            doc_value = _converted_doc_default(arg.get("type", "str"), doc_value)
            assert type(doc_value) is type(arg_value), f"default of {option}: {doc_value!r} vs {arg_value!r}"
        assert doc_value == arg_value, f"{key} of {option}: docs say {doc_value!r}, argspec says {arg_value!r}"
    assert docopt.get("description"), f"{option} has no description"
    if arg.get("required"):
        assert "default" not in arg and "default" not in docopt, f"required option {option} must not have a default"


def test_argspecs_are_valid_and_apply_defaults():
    spec = dict(_args.CONNECTION_ARGSPEC, **_args.REPOSITORY_ARGSPEC)
    result = ArgumentSpecValidator(spec).validate({"repository": "/srv/backups"})
    assert result.error_messages == []
    assert result.validated_parameters == {
        "uri": "qemu:///system",
        "repository": "/srv/backups",
        "lock_timeout": 60.0,
        "allow_unsafe_permissions": False,
        "required_mount": None,
    }
    missing = ArgumentSpecValidator(spec).validate({})
    assert any("repository" in msg for msg in missing.error_messages)


def test_required_mount_is_a_path_option():
    spec = dict(_args.CONNECTION_ARGSPEC, **_args.REPOSITORY_ARGSPEC)
    result = ArgumentSpecValidator(spec).validate({"repository": "/mnt/backup/repo", "required_mount": "/mnt/backup/"})
    assert result.error_messages == []
    assert result.validated_parameters["required_mount"] == "/mnt/backup/"
