#!/bin/sh
# A generic CI step for the vmbackup.libvirt backup policy check (docs/policy-check.md).
#
# Runs the playbook vmbackup.libvirt.policy_check with your inventory and policy, prints the
# Markdown summary (and appends it to the GitHub Actions job summary when there is one), and
# exits with the playbook's status: 0 the policy holds, 2 a rule failed (or a hypervisor or a
# repository could not be read), anything else the check could not run. The reports stay in
# $REPORT_DIR for the CI system to publish: policy.junit.xml (JUnit), policy.json, policy.md.
#
# Environment (all optional):
#   INVENTORY          inventory with the group "hypervisors" (default: inventory)
#   POLICY_FILE        extra-vars file with vmbackup_policy and the other vmbackup_policy_* variables
#                      (default: policy.yml; skipped when it does not exist - every default rule)
#   REPORT_DIR         report directory (default: policy-report, relative to the current directory)
#   COLLECTION_SOURCE  what to install: a Galaxy name (default vmbackup.libvirt), a tarball, or
#                      "none" when the collection is already on ANSIBLE_COLLECTIONS_PATH
#   COLLECTIONS_DIR    where to install it (default: .ci-collections)
#   BECOME             privilege escalation for ansible-playbook (default: -b; the repository is root's)
# Arguments are passed on to ansible-playbook (e.g. -e vmbackup_policy_repository=/srv/vmbackup).
set -eu

INVENTORY="${INVENTORY:-inventory}"
POLICY_FILE="${POLICY_FILE:-policy.yml}"
REPORT_DIR="${REPORT_DIR:-policy-report}"
COLLECTION_SOURCE="${COLLECTION_SOURCE:-vmbackup.libvirt}"
COLLECTIONS_DIR="${COLLECTIONS_DIR:-.ci-collections}"
BECOME="${BECOME--b}"

if [ "$COLLECTION_SOURCE" != none ]; then
    ansible-galaxy collection install --force -p "$COLLECTIONS_DIR" "$COLLECTION_SOURCE"
    ANSIBLE_COLLECTIONS_PATH="$COLLECTIONS_DIR${ANSIBLE_COLLECTIONS_PATH:+:$ANSIBLE_COLLECTIONS_PATH}"
    export ANSIBLE_COLLECTIONS_PATH
fi

set -- -e "vmbackup_policy_report_dir=$REPORT_DIR" "$@"
if [ -f "$POLICY_FILE" ]; then
    set -- -e "@$POLICY_FILE" "$@"
fi
rm -rf "$REPORT_DIR"    # a report left from an earlier run must not be published as this one's

status=0
# shellcheck disable=SC2086  # BECOME is empty or one option
ansible-playbook -i "$INVENTORY" $BECOME vmbackup.libvirt.policy_check "$@" || status=$?

if [ -f "$REPORT_DIR/policy.md" ]; then
    cat "$REPORT_DIR/policy.md"
    if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
        cat "$REPORT_DIR/policy.md" >> "$GITHUB_STEP_SUMMARY"
    fi
fi
case "$status" in
    0) echo "backup policy: met" ;;
    2) echo "backup policy: VIOLATED (see $REPORT_DIR/policy.junit.xml)" >&2 ;;
    *) echo "backup policy: the check could not run (ansible-playbook exit status $status)" >&2 ;;
esac
exit "$status"
