"""`pulsesync-agent` numbers: a bad flag or PULSESYNC_AGENT_* value is a usage error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pulsesync.edge_agent.cli import build_parser, main

RUN = ["run", "--source", "simulated-phone"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--speed", "0"], "argument --speed: '0' must be more than 0"),
        (["--speed", "nan"], "argument --speed: 'nan' is not a finite number"),
        (["--duration", "-1"], "argument --duration: '-1' must be more than 0"),
        (["--batch-size", "99999"], "argument --batch-size: '99999' is outside 1..5000"),
        (["--linger-ms", "-1"], "argument --linger-ms: '-1' must not be negative"),
        (["--progress", "fast"], "argument --progress: 'fast' is not a number"),
        (["--source-option", "sensors"], "argument --source-option: 'sensors' is not KEY=VALUE"),
    ],
)
def test_a_bad_number_is_a_usage_error_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*RUN, *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_environment_value_only_stops_the_command_that_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSESYNC_AGENT_SPEED", "fast")
    # `status` has no --speed: it runs (it raised ValueError from the parser's construction).
    assert main(["--state-dir", str(tmp_path), "status"]) == 0
    with pytest.raises(SystemExit):
        main(["--state-dir", str(tmp_path), *RUN])
    assert "argument --speed: 'fast' is not a number" in capsys.readouterr().err


def test_defaults_and_good_values_parse_to_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULSESYNC_AGENT_SEED", "7")
    args = build_parser().parse_args([*RUN, "--linger-ms", "0", "--batch-size", "5000"])
    assert (args.speed, args.seed, args.linger_ms, args.batch_size) == (1.0, 7, 0.0, 5000)
    options = build_parser().parse_args([*RUN, "--source-option", "addresses=A=B"]).source_option
    assert options == [("addresses", "A=B")]
    assert build_parser().parse_args(["scan", "--duration", "0.5"]).duration == 0.5


@pytest.mark.parametrize(
    "address",
    ["localhost:99999", "localhost:0", "http://host:50051", ":50051", "::1:50051", "a host:1"],
)
def test_a_malformed_server_address_stops_pairing_with_one_line(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--state-dir",
            str(tmp_path),
            "pair",
            "--server",
            address,
            "--code",
            "X",
            "--kind",
            "phone",
        ]
    )
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: server address {address!r} is not HOST:PORT (nor dns:///NAME:PORT, ipv4:, ipv6:, unix:)"
    )
    assert not (tmp_path / "credentials.json").exists()


@pytest.mark.parametrize(
    "address",
    [
        "localhost:50051",
        "api.example.org",  # gRPC's default port, 443
        "[::1]:50051",
        "dns:///pulsesync.example.org:50051",
        "dns://8.8.8.8/pulsesync.example.org",
        "ipv4:10.0.0.1:50051,10.0.0.2:50051",
        "unix:/run/pulsesync.sock",
    ],
)
def test_every_documented_server_address_form_is_taken(address: str) -> None:
    from pulsesync.edge_agent.cli import _servers

    assert _servers([address]) == (address,)
