"""A caller's Unix socket is created race-free and only in a directory no other user can
write (issue 13 point 6). The server runs in this process on the session's SoftHSM token,
so a test can act exactly where an attacker would: between the bind and the server's start."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from helseid_signer import server as server_module
from helseid_signer.config import ConfigError, load_settings
from tests.support.signerkit import keys_create, write_config


@pytest.fixture(scope="module")
def key(softhsm_token):
    keys_create(softhsm_token, "sock-key", "EC-P256", "ES256")
    return "sock-key"


def _settings(token, folder: Path, socket_path: Path, mode: str = "0o660"):
    config = write_config(
        folder / "signer.toml", token, issuer="http://127.0.0.1:9", client_id="c",
        keys={"sock-key": "ES256"}, profiles={"p": ("sock-key", "sock-key")},
        server_lines=(),
        extra_lines=(
            "[callers.local]", 'profiles = ["p"]', f'unix_socket = {{ path = "{socket_path}", mode = {mode} }}',
        ),
    )  # fmt: skip
    return load_settings(config)


async def _start_stop(settings) -> None:
    server = server_module.Server(settings)
    try:
        await server.start()
    finally:
        await server.stop(grace=0)


def test_a_symlink_swapped_in_for_the_new_socket_does_not_get_its_mode(softhsm_token, key, tmp_path, monkeypatch):
    """The attack: right after the bind, before the mode is set, the socket at the
    configured path is replaced by a symlink to a file of the service's user (0600). The
    old code's chmod followed the link and made that file 0660."""
    victim = tmp_path / "victim-secret"
    victim.write_text("secret")
    victim.chmod(0o600)
    socket_path = tmp_path / "local.sock"
    settings = _settings(softhsm_token, tmp_path, socket_path)
    swapped: list[str] = []
    real = server_module.Server._new_grpc_server

    class SwapOnStart:
        def __init__(self, grpc_server) -> None:
            self._server = grpc_server

        def __getattr__(self, name):
            return getattr(self._server, name)

        async def start(self) -> None:
            if os.path.lexists(socket_path):  # the attacker's move
                os.unlink(socket_path)
            os.symlink(victim, socket_path)
            swapped.append(str(socket_path))
            await self._server.start()

    def patched(self, identify):
        wrapped = SwapOnStart(real(self, identify))
        self.servers[-1] = wrapped
        return wrapped

    monkeypatch.setattr(server_module.Server, "_new_grpc_server", patched)
    asyncio.run(_start_stop(settings))
    assert swapped
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.read_text() == "secret"


def test_the_socket_gets_its_mode_and_no_temporary_folder_is_left(softhsm_token, key, tmp_path):
    socket_path = tmp_path / "local.sock"
    socket_path.write_bytes(b"")  # a regular file at the path is never replaced
    with pytest.raises(ConfigError, match="callers.local.unix_socket.path: .* exists and is not a socket"):
        asyncio.run(_start_stop(_settings(softhsm_token, tmp_path, socket_path)))
    socket_path.unlink()
    seen: list[int] = []

    async def run() -> None:
        server = server_module.Server(_settings(softhsm_token, tmp_path, socket_path, mode="0o620"))
        try:
            await server.start()
            info = os.lstat(socket_path)
            assert stat.S_ISSOCK(info.st_mode)
            seen.append(stat.S_IMODE(info.st_mode))
        finally:
            await server.stop(grace=0)

    asyncio.run(run())
    assert seen == [0o620]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signer.toml"]  # socket removed at stop, no .sock-*


@pytest.mark.parametrize(("mode", "owner", "refused"), [
    (0o777, None, "is writable by other users and not sticky"),
    (0o770, None, "is writable by other users and not sticky"),  # group members could swap it too
    (0o1777, None, None),  # sticky, owned by the service's user (as /tmp is by root)
    (0o755, 65534, "belongs to uid 65534"),
    (0o700, None, None),
])  # fmt: skip
def test_a_socket_directory_others_can_write_is_refused(softhsm_token, key, tmp_path, mode, owner, refused):
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(mode)
    if owner is not None:
        os.chown(folder, owner, -1)
    settings = _settings(softhsm_token, tmp_path, folder / "local.sock")
    if refused is None:
        asyncio.run(_start_stop(settings))
    else:
        with pytest.raises(ConfigError, match=f"callers.local.unix_socket.path: its directory {folder} .*{refused}"):
            asyncio.run(_start_stop(settings))
        assert list(folder.iterdir()) == []  # nothing bound, nothing left
