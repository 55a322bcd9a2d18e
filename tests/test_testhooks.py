"""Test hooks are an explicit, parsed-once object; nothing in the environment turns them on."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from vmmpy.errors import InvalidConfig
from vmmpy.testhooks import NO_HOOKS, TestHooks


def test_parse_reads_every_hook_once():
    hooks = TestHooks.parse("frame-delay-ms=150,keep-source=on,request-at-pause=reset,complete-paused=off")
    assert hooks == TestHooks(frame_delay_ms=150, keep_source=True, request_at_pause="reset")
    assert hooks.active == {"frame_delay_ms": 150, "keep_source": True, "request_at_pause": "reset"}
    assert NO_HOOKS.active == {}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("warp-speed=9", "unknown hook"),
        ("keep-source", "missing value"),
        ("keep-source=0x1", "expected on or off"),
        ("frame-delay-ms=-5", "expected a number"),
        ("request-at-pause=reboot", "expected reset or shutdown"),
        ("request-on-arrival=halt", "expected reset or shutdown"),
    ],
)
def test_bad_specs_are_refused_by_name(spec, message):
    with pytest.raises(InvalidConfig, match=message):
        TestHooks.parse(spec)


def test_active_hooks_are_announced(caplog):
    with caplog.at_level(logging.WARNING, logger="vmmpy.testhooks"):
        NO_HOOKS.announce()
        assert not caplog.records
        TestHooks(keep_source=True).announce()
    assert "TEST HOOKS ACTIVE" in caplog.text and "keep_source" in caplog.text


def test_the_environment_turns_nothing_on(tmp_path):
    """The old VMMPY_TEST_HOOKS variable leaking into a deployment must change nothing."""
    code = "from vmmpy import Vmm; v = Vmm(); print(v.test_hooks.active); v.close()"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"VMMPY_TEST_HOOKS": "request-at-pause=reset,keep-source=1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{}"


def test_cli_refuses_a_bad_hook_spec_as_a_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "vmmpy.cli", "--test-hooks", "bogus=1", "--memory", "size=64M"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "unknown hook" in out.stderr
