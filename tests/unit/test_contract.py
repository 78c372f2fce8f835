from __future__ import annotations

import json

import pytest

from agent.contract import Command, json_schema, parse_command
from agent.errors import PermanentError


def test_minimal_command_defaults_to_set():
    cmd = parse_command('{"device": "r1", "service": "wifi", "state": "off"}')
    assert (cmd.action, cmd.state, cmd.request_id, cmd.v) == ("set", "off", None, 1)


def test_refresh_needs_no_state():
    assert parse_command('{"device": "r1", "service": "wifi", "action": "refresh"}').state is None


@pytest.mark.parametrize("body, reason", [
    ('{"device": "r1", "service": "wifi"}', '"state" is required when action is "set"'),
    ('{"device": "r1", "service": "wifi", "action": "refresh", "state": "on"}', "must be absent"),
    ('{"device": "r1", "service": "wifi", "state": true}', "state: Input should be 'on' or 'off'"),
    ('{"device": "bad id", "service": "wifi", "state": "on"}', "device: String should match pattern"),
    ('{"device": "r1", "service": "wifi", "state": "on", "not_after": "2026-01-01T00:00:00"}', "not_after"),
    ('{"device": "r1", "service": "wifi", "state": "on", "meta": [1]}', "meta"),
    ('{"device": "r1", "service": "wifi", "state": "on", "v": 2}', "v: Input should be 1"),
    ('{"device": "r1"', "not valid JSON"),
    ("[]", "got an array"),
    ("true", "got a boolean"),
])
def test_bad_bodies_are_permanent_errors_with_readable_reasons(body, reason):
    with pytest.raises(PermanentError) as err:
        parse_command(body)
    assert reason in str(err.value)


def test_oversized_message_is_refused_before_parsing():
    body = json.dumps({"device": "r1", "service": "wifi", "state": "on", "meta": {"x": "y" * 1000}})
    with pytest.raises(PermanentError, match="over the 512-byte limit"):
        parse_command(body, max_bytes=512)


def test_schema_is_generated_from_the_model():
    schema = json_schema()
    assert schema["title"] == "DeviceCommand" and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"device", "service"}
    assert set(schema["properties"]) == set(Command.model_fields)
