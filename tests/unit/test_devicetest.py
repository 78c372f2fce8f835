"""`agentctl device test`: the pure part (fixes for each error kind, the deadline, the output)."""

from __future__ import annotations

import json

from agent.errors import ConfigError, NoAnswerError, PermanentError, TransientError, UnreachableError
from agent.model.device import Device
from agent.ops.devicetest import Result, Step, as_json, as_text, deadline, failed, fix_for, skip_rest, step_names

DEV = Device("router-1", "http", "10.88.0.1", options={"timeout": 3})


def test_config_error_points_at_the_option_or_credential():
    fix = fix_for(ConfigError("http: read_path is required"), DEV, None)
    assert "--option" in fix and "--credential" in fix and "AGENT_CREDENTIALS_DIR" in fix


def test_unreachable_and_silent_devices_point_at_the_vpn_and_doctor():
    for exc in (UnreachableError("refused"), NoAnswerError("timed out"), TimeoutError()):
        fix = fix_for(exc, DEV, "alice")
        assert "VPN" in fix and "agentctl doctor" in fix and "router-1" in fix


def test_permanent_error_points_at_the_service_key():
    fix = fix_for(PermanentError("HTTP 404"), DEV, "alice")
    assert "'alice'" in fix and "docs/drivers.md" in fix and "http" in fix


def test_transient_error_says_try_again_and_a_bug_says_report_it():
    assert "try again" in fix_for(TransientError("HTTP 503"), DEV, None)
    assert "driver bug" in fix_for(KeyError("x"), DEV, None)


def test_failed_step_names_the_kind_and_escapes_device_text():
    step = failed("probe", UnreachableError("cannot connect:\x1b[2J\nforged line"), DEV, None)
    assert step.kind == "unreachable" and not step.ok
    assert step.detail.startswith("unreachable: cannot connect:") and "\n" not in step.detail
    assert "\x1b" not in step.detail
    assert failed("probe", TimeoutError(), DEV, None).kind == "no_answer"
    assert failed("read x", ValueError("boom"), DEV, "x").kind == "error"


def test_deadline_is_the_longer_timeout_plus_a_margin():
    assert deadline(DEV, 10.0) == 11.0
    assert deadline(Device("d", "http", options={"timeout": 30}), 10.0) == 31.0
    assert deadline(Device("d", "http", options={"timeout": "bad"}), 2.0) == 3.0


def test_steps_after_a_failure_are_reported_as_not_run():
    result = Result("router-1", "alice", [Step("inventory", True, "found"), failed("driver", ConfigError("x"), DEV,
                                                                                    "alice")])
    skip_rest(result, step_names("alice"))
    assert [s.name for s in result.steps] == ["inventory", "driver", "options", "credential", "probe", "read alice"]
    assert [s.word for s in result.steps] == ["PASS", "FAIL", "SKIP", "SKIP", "SKIP", "SKIP"]
    assert not result.ok


def test_text_output_shows_each_step_and_the_fix_of_the_failed_one():
    result = Result("router-1", None, [Step("inventory", True, "found"),
                                       failed("probe", UnreachableError("refused"), DEV, None)])
    text = as_text(result)
    assert "PASS  inventory: found" in text
    assert "FAIL  probe: unreachable: refused" in text
    assert "      fix: check the VPN" in text
    assert text.endswith("device router-1: test failed")


def test_text_output_of_a_success_names_the_state():
    result = Result("router-1", "alice", [Step("read alice", True, "on")], state="on")
    assert as_text(result) == "PASS  read alice: on\ndevice router-1 can be driven"


def test_json_output_carries_ok_state_and_steps():
    result = Result("router-1", "alice", [Step("read alice", True, "off")], state="off")
    doc = json.loads(as_json(result))
    assert doc["ok"] is True and doc["state"] == "off" and doc["service"] == "alice"
    assert doc["steps"] == [{"name": "read alice", "ok": True, "detail": "off", "kind": None, "fix": None,
                             "skipped": False}]


def test_a_service_key_with_control_characters_is_escaped_in_the_step_name():
    assert step_names("a\nb")[-1] == "read a\\nb"


def test_a_test_without_a_service_says_that_it_read_nothing():
    probed = Result("r1", None, [Step("probe", True, "answered")])
    assert as_text(probed).splitlines()[-1] == (
        "no service was read: add --service KEY to read one (e.g. `agentctl device test r1 --service <key>`)")
    read = Result("r1", "pppoe:alice", [Step("probe", True, "answered"), Step("read pppoe:alice", True, "on")])
    assert "no service was read" not in as_text(read)
