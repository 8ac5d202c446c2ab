"""`pulsesync keys rotate` and the server refusing to start without its key."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from pulsesync.server.app import running_server
from pulsesync.server.cli import build_parser, config_from, main
from pulsesync.server.config import ServerConfig
from pulsesync.server.profiles.crypto import FileKeyStore, KeyFileError
from pulsesync.server.storage.sqlite.keys import KeyVaultError


async def _server_with_a_profile(config: ServerConfig) -> None:
    async with running_server(config) as server:
        user_id = await server.app.identity.add_user("ada")
        await server.app.profiles.edit(user_id, lambda p: setattr(p, "time_zone", "UTC"))


async def test_server_refuses_a_wrong_or_missing_key_file(tmp_path: Path) -> None:
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.2)
    await _server_with_a_profile(config)
    # Given explicitly (as --key-file / PULSESYNC_KEY_FILE would): a different key file.
    other = tmp_path / "other.key"
    FileKeyStore.create(other)
    wrong = ServerConfig(port=0, data_dir=tmp_path, key_file=other, grace_seconds=0.2)
    with pytest.raises(KeyFileError) as err:
        async with running_server(wrong):
            pass
    assert str(other) in err.value.message
    assert "wrong key file" in err.value.message
    # Missing altogether.
    (tmp_path / "kek.key").rename(tmp_path / "moved.key")
    with pytest.raises(SystemExit, match="does not exist"):
        async with running_server(config):
            pass
    (tmp_path / "moved.key").rename(tmp_path / "kek.key")
    async with running_server(config) as server:
        assert (await server.app.profiles.get(1)).time_zone == "UTC"


async def test_cli_rotate_then_the_server_reads_old_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.2)
    await _server_with_a_profile(config)
    before = (tmp_path / "kek.key").read_text()
    rc = await asyncio.to_thread(main, ["keys", "rotate", "--data-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "re-wrapped 1 profile data key(s)" in out
    assert (tmp_path / "kek.key").read_text() != before
    assert (tmp_path / "kek.key").stat().st_mode & 0o777 == 0o600
    async with running_server(config) as server:
        assert (await server.app.profiles.get_version(1, 1)).time_zone == "UTC"


async def test_server_refuses_a_missing_key_vault_and_takes_it_by_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServerConfig(port=0, data_dir=tmp_path, grace_seconds=0.2)
    await _server_with_a_profile(config)
    moved = tmp_path / "vault-elsewhere.db"
    (tmp_path / "keyvault.db").rename(moved)
    with pytest.raises(KeyVaultError) as err:
        async with running_server(config):
            pass
    assert str(tmp_path / "keyvault.db") in err.value.message
    assert "PULSESYNC_KEY_VAULT" in err.value.message
    # The flag and the environment variable reach every command's configuration.
    args = build_parser().parse_args(
        ["serve", "--data-dir", str(tmp_path), "--key-vault", str(moved)]
    )
    assert config_from(args).vault_file == moved
    monkeypatch.setenv("PULSESYNC_KEY_VAULT", str(moved))
    args = build_parser().parse_args(["privacy", "audit", "--data-dir", str(tmp_path)])
    assert config_from(args).vault_file == moved
    rc = await asyncio.to_thread(main, ["keys", "rotate", "--data-dir", str(tmp_path)])
    assert rc == 0
    async with running_server(replace(config, key_vault=moved)) as server:
        assert (await server.app.profiles.get(1)).time_zone == "UTC"
