"""docs/examples/awx: the survey specs (AWX's JSON format) ask only for variables the playbooks
document, with their types, defaults and choices; the job templates, schedules (RRULEs) and the
workflow of configure.yml refer to what exists; secrets are only handled by no_log tasks."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
AWX = ROOT / "docs" / "examples" / "awx"
PROJECT = AWX / "project"
SURVEY_TYPES = {"text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect"}
QUESTION_KEYS = {"question_name", "question_description", "required", "type", "variable", "default", "min", "max", "choices"}
# Survey defaults that differ from the playbook's on purpose (and docs/awx.md says why).
DELIBERATE = {
    "vmbackup_hosts": "hypervisors",      # the inventory group of docs/awx.md, not every host
    "vmbackup_restore_host": "",          # required: one host; the playbook's localhost is the EE in AWX
    "vmbackup_drill_host": "",            # required: one host, as above
    "vmbackup_policy_repository_host": "",  # required: a host that mounts the repositories, not the EE
}
SECRET_WORDS = ("password", "token", "secret", "key", "webhook")


class _Loader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
    """SafeLoader that reads Ansible's !unsafe tag as the plain string it marks."""


_Loader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))


def configure() -> dict:
    return yaml.load((AWX / "configure.yml").read_text(), Loader=_Loader)[0]  # nosec: a SafeLoader


def job_templates() -> list[dict]:
    return configure()["vars"]["vmbackup_awx_job_templates"]


def collection_playbook(wrapper: str) -> pathlib.Path:
    """The collection playbook a project wrapper imports."""
    plays = yaml.safe_load((PROJECT / wrapper).read_text())
    assert len(plays) == 1, wrapper
    target = plays[0]["ansible.builtin.import_playbook"]
    assert target.startswith("vmbackup.libvirt."), target
    return ROOT / "playbooks" / f"{target.split('.', 2)[2]}.yml"


def header(path: pathlib.Path) -> str:
    """The comment block at the top of a playbook (its documentation)."""
    lines = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def role_readmes(path: pathlib.Path) -> str:
    """The READMEs of the roles the playbook's plays use (the weekly/monthly variables are documented there)."""
    names = {(r["role"] if isinstance(r, dict) else r).split(".")[-1] for play in yaml.safe_load(path.read_text()) for r in play.get("roles", [])}
    return "\n".join((ROOT / "roles" / n / "README.md").read_text() for n in sorted(names))


def role_options(path: pathlib.Path) -> dict[str, dict]:
    """Options of the main entry point of every role the playbook's plays use."""
    out: dict[str, dict] = {}
    for play in yaml.safe_load(path.read_text()):
        for role in play.get("roles", []):
            name = (role["role"] if isinstance(role, dict) else role).split(".")[-1]
            specs = yaml.safe_load((ROOT / "roles" / name / "meta" / "argument_specs.yml").read_text())
            out.update(specs["argument_specs"]["main"]["options"])
    return out


_MAPPING_RE = re.compile(r"^\{\{\s*(\w+)\s*\|\s*default\(")


def default_calls(text: str, var: str) -> list[tuple[str, bool]]:
    """Every `var | default(X[, true])` of a playbook: (X as written, whether an empty value means unset)."""
    out = []
    for match in re.finditer(rf"\b{re.escape(var)}\s*\|\s*default\(", text):
        depth, i = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        args = text[match.end():i - 1]
        parts, depth, last = [], 0, 0
        for j, ch in enumerate(args):
            depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                parts.append(args[last:j])
                last = j + 1
        parts.append(args[last:])
        out.append((parts[0].strip(), len(parts) > 1 and parts[1].strip() == "true"))
    return out


def literal(expr: str):
    """The value of a literal default expression (none, numbers, strings, {} and []); KeyError otherwise."""
    if expr == "none":
        return None
    try:
        value = yaml.safe_load(expr)
    except yaml.YAMLError as exc:
        raise KeyError(expr) from exc
    if isinstance(value, str) and not re.fullmatch(r"""(['"]).*\1""", expr):
        raise KeyError(expr)  # a variable name, not a string literal
    return value


def playbook_mappings(path: pathlib.Path) -> dict[str, str]:
    """playbook variable -> the role variable it sets, from `role_var: "{{ var | default(X) }}"`."""
    out = {}
    for play in yaml.safe_load(path.read_text()):
        for role_var, value in (play.get("vars") or {}).items():
            match = _MAPPING_RE.match(str(value).strip())
            if match:
                out[match.group(1)] = role_var
    return out


SURVEYED = [t for t in job_templates() if t["survey"]]


@pytest.mark.parametrize("template", SURVEYED, ids=[t["name"] for t in SURVEYED])
def test_survey_asks_for_documented_variables(template):
    survey = json.loads((AWX / template["survey"]).read_text())
    assert set(survey) == {"name", "description", "spec"} and survey["spec"], survey.keys()
    playbook = collection_playbook(template["playbook"])
    doc = header(playbook) + "\n" + role_readmes(playbook)
    options = role_options(playbook)
    mappings = playbook_mappings(playbook)
    variables = [q["variable"] for q in survey["spec"]]
    assert len(variables) == len(set(variables)), variables
    for q in survey["spec"]:
        var = q["variable"]
        assert set(q) <= QUESTION_KEYS and {"question_name", "required", "type", "variable", "default"} <= set(q), q
        assert q["type"] in SURVEY_TYPES and isinstance(q["required"], bool), q
        assert re.fullmatch(r"vmbackup_[a-z0-9_]+", var), var  # the collection's prefix, a valid name
        assert not any(w in var for w in SECRET_WORDS) or q["type"] == "password", var
        # Documented: in the playbook's header or its role's README, or an option of its role (argument_specs).
        assert var in doc or var in options, f"{template['survey']}: {var} is not documented by {playbook.name}"
        # What the variable ends up as: a role option (directly, or through the playbook's mapping).
        role_var = mappings.get(var, var)
        spec = options.get(role_var)
        calls = default_calls(playbook.read_text(), var)
        if var in DELIBERATE:
            assert q["default"] == DELIBERATE[var], q
        elif q["default"] == "" and calls:
            # An empty answer must mean "unset": default(X, true) everywhere the playbook reads it.
            assert all(empty for dummy, empty in calls), (var, calls)
        elif calls:
            defaults = {json.dumps(literal(expr)) for expr, dummy in calls}
            assert len(defaults) == 1, (var, calls)
            expected = json.loads(defaults.pop())
            expected = str(expected).lower() if isinstance(expected, bool) else expected
            assert q["default"] == expected, (var, q["default"], expected)
        elif spec is not None:
            expected = spec.get("default")
            if spec.get("type") in ("bool", "raw") and isinstance(expected, bool):
                expected = str(expected).lower()
            elif expected is None:
                expected = ""
            elif spec.get("type") == "list":
                expected = ",".join(expected)
            assert q["default"] == expected, (var, q["default"], expected)
        else:
            raise AssertionError(f"{var}: no default to compare with in {playbook.name}")
        # Types and choices the variable accepts.
        if q["type"] in ("integer", "float"):
            assert isinstance(q["default"], int) and q.get("min", q["default"]) <= q["default"] <= q.get("max", q["default"]), q
            assert spec is None or spec.get("type") in ("int", "float", "raw"), (var, spec)
        elif q["type"] == "multiplechoice":
            assert q["default"] in q["choices"], q
            if spec is not None and spec.get("choices"):
                assert set(q["choices"]) <= set(spec["choices"]), (var, q["choices"], spec["choices"])
            elif spec is not None and spec.get("type") in ("bool", "raw"):
                assert set(q["choices"]) <= {"true", "false"}, q
        elif q["type"] in ("text", "textarea"):
            assert isinstance(q["default"], str), q
            # Text reaches str/path options, lists as comma-separated patterns, raw ones as text.
            assert spec is None or spec.get("type") in ("str", "path", "list", "raw"), (var, spec)
            if q["required"]:
                assert q.get("min", 1) >= 1, q


def test_project_wrappers_and_job_templates():
    names = [t["name"] for t in job_templates()]
    assert len(names) == len(set(names))
    for t in job_templates():
        assert (PROJECT / t["playbook"]).exists(), t
        if t["playbook"] != "notify.yml":
            assert collection_playbook(t["playbook"]).exists(), t
        if t["survey"]:
            assert (AWX / t["survey"]).exists(), t
        assert isinstance(t["timeout"], int) and t["timeout"] > 0
    # Every wrapper of the project is a job template.
    assert sorted(p.name for p in PROJECT.glob("*.yml")) == sorted(t["playbook"] for t in job_templates())
    req = yaml.safe_load((PROJECT / "collections" / "requirements.yml").read_text())
    assert [c["name"] for c in req["collections"]] == ["vmbackup.libvirt"]
    inventory = yaml.safe_load((PROJECT / "inventory" / "hypervisors.yml").read_text())
    assert "hypervisors" in inventory["all"]["children"]


def parse_rrule(text: str) -> tuple[dt.datetime, dict[str, str]]:
    match = re.fullmatch(r"DTSTART;TZID=UTC:(\d{8}T\d{6}) RRULE:(\S+)", text)
    assert match, text
    start = dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)
    rule = dict(part.split("=", 1) for part in match.group(2).split(";"))
    assert rule["FREQ"] in ("DAILY", "WEEKLY", "MONTHLY") and int(rule.get("INTERVAL", 1)) >= 1, rule
    return start, rule


def test_schedules():
    conf = configure()
    targets = {t["name"] for t in job_templates()}
    workflows = [t["awx.awx.workflow_job_template"]["name"] for t in conf["tasks"] if "awx.awx.workflow_job_template" in t]
    days = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"]
    by_target = {}
    for s in conf["vars"]["vmbackup_awx_schedules"]:
        assert s["unified_job_template"] in targets | set(workflows), s
        start, rule = parse_rrule(s["rrule"])
        by_target[s["unified_job_template"]] = (start, rule)
        # The first run is a real occurrence of the rule (AWX counts DTSTART in).
        if rule["FREQ"] == "WEEKLY":
            assert rule["BYDAY"] == days[start.weekday()], s
        if "BYMONTHDAY" in rule:
            assert int(rule["BYMONTHDAY"]) == start.day, s
        if rule["FREQ"] == "MONTHLY" and "BYDAY" in rule:
            nth, day = int(rule["BYDAY"][:-2]), rule["BYDAY"][-2:]
            assert day == days[start.weekday()] and (start.day - 1) // 7 + 1 == nth, s
        if "extra_data" in s:  # a schedule's extra data must be survey answers of its template
            template = next(t for t in job_templates() if t["name"] == s["unified_job_template"])
            asked = {q["variable"] for q in json.loads((AWX / template["survey"]).read_text())["spec"]}
            assert set(s["extra_data"]) <= asked, set(s["extra_data"]) - asked
    # The weekly schedule launches the workflow (so the branches run); the monthly one never at the weekly's hour.
    weekly_start, weekly_rule = by_target["vmbackup weekly backup"]
    assert weekly_rule["FREQ"] == "WEEKLY"
    monthly_start, monthly_rule = by_target["vmbackup monthly"]
    assert monthly_rule["FREQ"] == "MONTHLY" and monthly_start.time() != weekly_start.time()


def test_workflow_branches_on_the_backup_outcome():
    conf = configure()
    (wf,) = [t["awx.awx.workflow_job_template"] for t in conf["tasks"] if "awx.awx.workflow_job_template" in t]
    nodes = {n["identifier"]: n for n in wf["workflow_nodes"]}
    templates = {t["name"]: t for t in job_templates()}
    for node in nodes.values():
        assert node["unified_job_template"]["type"] == "job_template" and node["unified_job_template"]["name"] in templates
        for edge in node.get("related", {}).values():
            assert all(e["identifier"] in nodes for e in edge)
    playbook_of = {i: templates[n["unified_job_template"]["name"]]["playbook"] for i, n in nodes.items()}
    edges = {(playbook_of[i], kind, playbook_of[e["identifier"]]) for i, n in nodes.items()
             for kind, targets in n.get("related", {}).items() for e in targets}
    assert edges == {("backup_weekly.yml", "success_nodes", "policy_check.yml"), ("backup_weekly.yml", "failure_nodes", "notify.yml"),
                     ("policy_check.yml", "failure_nodes", "notify.yml")}, edges
    # notify.yml reads the set_stats key the backup summary publishes.
    summary = yaml.safe_load((ROOT / "roles" / "backup" / "tasks" / "summary.yml").read_text())
    published = {k for task in summary if "ansible.builtin.set_stats" in task for k in task["ansible.builtin.set_stats"]["data"]}
    assert "vmbackup_backup_run" in published
    assert "vmbackup_backup_run" in (PROJECT / "notify.yml").read_text()


def tasks_using(path: pathlib.Path, variables: tuple[str, ...]) -> list[dict]:
    tasks = []
    for play in yaml.load(path.read_text(), Loader=_Loader):  # nosec: a SafeLoader
        for task in play.get("tasks", []):
            args = {k: v for k, v in task.items() if k not in ("name", "when", "no_log", "failed_when", "register")}
            if any(v in json.dumps(args) for v in variables):
                tasks.append(task)
    return tasks


def test_secrets_only_in_no_log_tasks():
    used = tasks_using(AWX / "configure.yml", ("vmbackup_awx_ssh_key", "vmbackup_awx_webhook_url"))
    assert len(used) == 2 and all(t.get("no_log") is True for t in used), [t["name"] for t in used]
    used = tasks_using(PROJECT / "notify.yml", ("vmbackup_notify_webhook_url",))
    assert [t["name"] for t in used] == ["Post the message to the webhook"] and used[0]["no_log"] is True
    # The machine credential carries the key; no job template asks for one.
    for t in job_templates():
        if t["survey"]:
            spec = json.loads((AWX / t["survey"]).read_text())["spec"]
            assert not [q for q in spec if q["type"] == "password"], t


def test_docs_cover_the_examples():
    text = (ROOT / "docs" / "awx.md").read_text()
    for t in job_templates():
        assert t["name"] in text and t["playbook"] in text, t["name"]
        if t["survey"]:
            assert f"examples/awx/{t['survey']}" in text, t["survey"]
    for s in configure()["vars"]["vmbackup_awx_schedules"]:
        assert s["rrule"] in text, s["name"]
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (ROOT / "docs" / link).exists(), link
