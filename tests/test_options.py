"""vmmpy.options: the one `key=value,...` parser and the one command-line boolean rule, and the
CH request bodies built from option strings (`vmmpy --restore`, `vmmpy-remote`). No KVM needed."""

from __future__ import annotations

import json

import pytest

from vmmpy import remote
from vmmpy.cli import parse_restore
from vmmpy.config import read_request_body, request_body_from_options
from vmmpy.errors import InvalidConfig
from vmmpy.migration.source import MigrationOptions
from vmmpy.options import parse_bool, parse_int, parse_options, parse_path_or_fd, parse_size, split_options

MIB = 1 << 20


def test_split_options_quotes():
    assert split_options('a=1,b="x,y",c', "--x") == [("a", "1"), ("b", "x,y"), ("c", None)]
    with pytest.raises(InvalidConfig, match="unbalanced"):
        split_options('a="x', "--x")


@pytest.mark.parametrize("text", ["on", "true", "ON", "True", " on "])
def test_true_words(text):
    assert parse_bool(text, "--x y") is True


@pytest.mark.parametrize("text", ["off", "false", "OFF", "False"])
def test_false_words(text):
    assert parse_bool(text, "--x y") is False


@pytest.mark.parametrize("text", ["yes", "no", "1", "0", "", "enabled", "0x1"])
def test_other_booleans_are_refused_naming_the_option(text):
    with pytest.raises(InvalidConfig) as e:
        parse_bool(text, "--disk readonly")
    assert str(e.value) == f"--disk readonly={text!r}: expected on or off (or true/false)"


@pytest.mark.parametrize(
    "text, value",
    [("512M", 512 * MIB), ("1G", 1 << 30), ("4096K", 4 * MIB), ("1048576", MIB), ("2g", 2 << 30), (" 64M ", 64 * MIB)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12X", "", "M", "-1M", "1.5G", "0x10", "1 G", "²M"])
def test_parse_size_bad(text):
    with pytest.raises(InvalidConfig) as e:
        parse_size(text)
    assert repr(text) in str(e.value)


def test_parse_int():
    assert parse_int("150", "--x n") == 150
    for bad in ("-5", "1.0", "", "²", "ten"):
        with pytest.raises(InvalidConfig, match="expected a number"):
            parse_int(bad, "--x n")


def test_parse_options():
    assert parse_options("a=1,b=2", "--x", ("a", "b"), "a=N") == {"a": "1", "b": "2"}
    assert parse_options("anything=1", "--x", None, "k=v") == {"anything": "1"}
    for text, message in [
        ("a=1,a=2", "option 'a' given twice"),
        ("c=1", "unsupported option 'c'; expected a=N"),
        ("a", "'a' has no value"),
        ("a=1,", "empty option"),
    ]:
        with pytest.raises(InvalidConfig, match=message):
            parse_options(text, "--x", ("a", "b"), "a=N")


def test_a_bare_first_item_or_url_sets_the_bare_key():
    def parse(text):
        return parse_options(text, "--x", None, "url=U", bare="url")

    assert parse("tcp:127.0.0.1:6000,downtime_ms=3") == {"url": "tcp:127.0.0.1:6000", "downtime_ms": "3"}
    assert parse("file:///snap/a=b") == {"url": "file:///snap/a=b"}
    assert parse("url=unix:/x") == {"url": "unix:/x"}
    with pytest.raises(InvalidConfig, match="'y' has no value"):
        parse("url=unix:/x,y")


def test_parse_path_or_fd():
    assert parse_path_or_fd("/run/a.sock", "--f") == ("/run/a.sock", None)
    assert parse_path_or_fd("path=/run/a.sock", "--f") == ("/run/a.sock", None)
    assert parse_path_or_fd('path="/run/a,b.sock"', "--f") == ("/run/a,b.sock", None)
    assert parse_path_or_fd("fd=7", "--f") == (None, 7)
    for bad, fragment in [
        ("fd=x", "fd='x'"),
        ("fd=", "fd=''"),
        ("fd", "'fd'"),
        ("path=", "'path='"),
        ("path", "'path'"),
        ("path=/a,fd=3", "'path=/a,fd=3'"),
        ("", "empty value"),
    ]:
        with pytest.raises(InvalidConfig) as e:
            parse_path_or_fd(bad, "--f")
        assert fragment in str(e.value), (bad, str(e.value))


# ---- request bodies from option strings --------------------------------------------------------


def test_options_become_the_bodys_json_types():
    body = request_body_from_options(
        "SendMigrationData",
        "tcp:127.0.0.1:6000,local=off,auto_converge=TRUE,downtime_ms=30,max_bandwidth=32M,timeout_strategy=Ignore",
        "send-migration",
        "destination_url",
    )
    assert body == {
        "destination_url": "tcp:127.0.0.1:6000",
        "local": False,
        "auto_converge": True,
        "downtime_ms": 30,
        "max_bandwidth": "32M",
        "timeout_strategy": "Ignore",
    }
    assert (
        request_body_from_options("SendMigrationData", "unix:/m,max_bandwidth=1024", "x", "destination_url")[
            "max_bandwidth"
        ]
        == 1024
    )
    # CH's default spelled out on the command line is a JSON false, as ch-remote sends it.
    assert request_body_from_options("SendMigrationData", "unix:/m,preserve_source=off", "x", "destination_url") == {
        "destination_url": "unix:/m",
        "preserve_source": False,
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("unix:/m,local=yes", "send-migration local='yes': expected on or off"),
        ("unix:/m,local=", "send-migration local='': expected on or off"),
        ("unix:/m,downtime_ms=fast", "send-migration downtime_ms='fast': expected a number"),
    ],
)
def test_bad_option_values_are_refused_naming_the_option(text, message):
    with pytest.raises(InvalidConfig, match=message):
        request_body_from_options("SendMigrationData", text, "send-migration", "destination_url")


def test_unknown_options_are_left_to_the_body_reader_to_refuse():
    body = request_body_from_options("SendMigrationData", "unix:/m,colour=blue", "x", "destination_url")
    assert body == {"destination_url": "unix:/m", "colour": "blue"}
    with pytest.raises(InvalidConfig, match="unsupported SendMigrationData fields: colour"):
        read_request_body("SendMigrationData", body)


def test_cli_restore_reads_chs_restore_config():
    assert parse_restore("source_url=file:///snap") == {"source_url": "file:///snap"}
    assert parse_restore("file:///snap,resume=on") == {"source_url": "file:///snap", "resume": True}
    assert parse_restore("source_url=file:///snap,resume=off,prefault=on") == {
        "source_url": "file:///snap",
        "resume": False,
    }
    for text, message in [
        ("source_url=file:///snap,resume=maybe", "--restore resume='maybe': expected on or off"),
        ("resume=on", "RestoreConfig needs source_url"),
        ("file:///snap,teleport=on", "unsupported RestoreConfig fields: teleport"),
    ]:
        with pytest.raises(InvalidConfig, match=message):
            parse_restore(text)


def test_api_booleans_are_json_booleans():
    """A string is never a boolean in a JSON body: "off" must not read as a request to resume."""
    for value in ("off", "on", "false", 0, 1):
        with pytest.raises(InvalidConfig) as e:
            read_request_body("RestoreConfig", {"source_url": "file:///s", "resume": value})
        assert f"resume={json.dumps(value)}: must be a boolean" in str(e.value)
    assert read_request_body("RestoreConfig", {"source_url": "file:///s", "resume": False}) == {
        "source_url": "file:///s",
        "resume": False,
    }


def test_python_migration_options_take_bools_only():
    assert MigrationOptions.from_dict({"destination_url": "unix:/m", "local": True}).local is True
    assert MigrationOptions.from_dict({"destination_url": "unix:/m", "max_bandwidth": "32M"}).max_bandwidth == 32 * MIB
    for key, value in [("local", "off"), ("auto_converge", 1), ("downtime_ms", "300"), ("connections", True)]:
        with pytest.raises(InvalidConfig, match=f"{key}="):
            MigrationOptions.from_dict({"destination_url": "unix:/m", key: value})


def test_remote_refuses_a_bad_boolean_before_sending(capsys):
    with pytest.raises(SystemExit) as e:
        remote.main(["--api-socket", "/nonexistent/x.sock", "send-migration", "unix:/m,local=yes"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "local='yes'" in err, err
    with pytest.raises(SystemExit) as e:
        remote.main(["--api-socket", "fd=3", "ping"])
    assert e.value.code == 2
