"""`ssh`: any host with a shell (asyncssh). A service is switched and read by commands from the device's
options (or a preset); agent.drivers.ssh_proto holds the templates and what replies mean.

Options: username; known_hosts (a file) or host_key (OpenSSH public key line(s)): the host key is
always verified; on_command / off_command / status_command with {service}; service_pattern;
status_on_exit / status_off_exit or on_pattern / off_pattern; fail_pattern; probe_command; quote;
preset (systemd, openwrt, routeros-cli); timeout (seconds for a whole operation, connecting included);
max_output_bytes. The credential is a private key (OpenSSH or PEM, unencrypted) or a password,
told apart by its content. One connection per device, reused, and opened again when it drops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncssh

from agent.drivers import ssh_proto as p
from agent.drivers.base import DriverContext
from agent.errors import ConfigError, NoAnswerError, TransientError, UnreachableError
from agent.model.device import Device, State
from agent.text import clean

T = TypeVar("T")
KEEPALIVE_SECONDS = 30.0  # an idle connection that stops answering is noticed and dropped within ~90 s


class _Stale(Exception):
    """The cached connection was gone before the command could start: safe to reconnect and run it."""


class _Collector(asyncssh.SSHClientSession[bytes]):
    """Keeps the first `cap` bytes of stdout and of stderr; the rest is counted out, never held."""

    def __init__(self, cap: int) -> None:
        self.cap, self.out, self.err, self.truncated = cap, bytearray(), bytearray(), False

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        buf = self.err if datatype == asyncssh.EXTENDED_DATA_STDERR else self.out
        room = self.cap - len(buf)
        if len(data) > room and buf is self.out:
            self.truncated = True
        buf += data[: max(room, 0)]


async def _exec(conn: asyncssh.SSHClientConnection, command: str, cap: int) -> p.Result:
    """Run one command (stdin closed at once) and collect its bounded output and exit status."""
    session = _Collector(cap)
    try:
        chan, _ = await conn.create_session(lambda: session, command, encoding=None)
    except (asyncssh.ChannelOpenError, asyncssh.DisconnectError) as exc:
        raise _Stale(str(exc)) from None
    try:
        chan.write_eof()
        await chan.wait_closed()
    finally:
        if chan.get_exit_status() is None:  # cut short (timeout): end the command too, not only the channel
            with contextlib.suppress(Exception):
                chan.kill()
        chan.close()
    return p.Result(chan.get_exit_status(), bytes(session.out), bytes(session.err), session.truncated)


class SshDriver:
    name = "ssh"

    def __init__(self, context: DriverContext | None = None) -> None:
        self._context = context or DriverContext()
        self._conns: dict[str, tuple[tuple[Any, ...], asyncssh.SSHClientConnection]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def validate_options(self, device: Device) -> None:
        opts = self._options(device)
        _trusted_keys(device, opts)
        if not device.credential:
            raise ConfigError("ssh: the device needs a credential (a private key or a password)")

    async def read(self, device: Device, service: str) -> State:
        opts = self._options(device)
        command = p.command_for(opts, service, None)
        result = await self._run(device, opts, command)
        return p.state_of(opts, result, f"{device.id}: {service}")

    async def apply(self, device: Device, service: str, state: State) -> None:
        opts = self._options(device)
        command = p.command_for(opts, service, state)
        result = await self._run(device, opts, command)
        p.check_applied(opts, result, f"{device.id}: {service} {state}")

    async def probe(self, device: Device) -> None:
        """Connect (or reuse the connection); with probe_command, also run it and want exit 0."""
        opts = self._options(device)
        if opts.probe_command is None:
            await self._bounded(device, opts, lambda: self._connection(device, opts))
            return
        result = await self._run(device, opts, opts.probe_command)
        if result.exit_status != 0:
            raise TransientError(f"{device.id}: probe_command exit {result.exit_status}: {result.said()}")

    async def close(self) -> None:
        conns = [conn for _key, conn in self._conns.values()]
        self._conns.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.wait_closed()

    # -- transport -----------------------------------------------------------------------

    def _options(self, device: Device) -> p.Options:
        return p.parse_options(device.options, device.address, self._context.device_timeout)

    async def _run(self, device: Device, opts: p.Options, command: str) -> p.Result:
        """One command within the device's timeout; a connection found dead before it starts is
        opened again once (nothing ran), one that dies while it runs is a transient error."""
        async def attempt() -> p.Result:
            conn = await self._connection(device, opts)
            try:
                return await _exec(conn, command, opts.max_output_bytes)
            except _Stale:
                self._forget(device.id, conn)  # only that one: a concurrent call may have replaced it already
                return await _exec(await self._connection(device, opts), command, opts.max_output_bytes)

        try:
            return await self._bounded(device, opts, attempt)
        except _Stale as exc:
            raise TransientError(f"{device.id}: the connection to {device.address} closed: {clean(exc, 200)}") from None

    async def _bounded(self, device: Device, opts: p.Options, op: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(opts.timeout):
                return await op()
        except TimeoutError:
            self._forget(device.id)  # a connection that let a command hang may be half-open: start afresh
            raise NoAnswerError(f"{device.id}: no answer from {device.address} within {opts.timeout:g}s") from None

    async def _connection(self, device: Device, opts: p.Options) -> asyncssh.SSHClientConnection:
        key = (opts.host, opts.port, opts.username, opts.known_hosts, opts.host_keys, device.credential)
        async with self._locks.setdefault(device.id, asyncio.Lock()):
            cached = self._conns.get(device.id)
            if cached is not None and cached[0] == key and not cached[1].is_closed():
                return cached[1]
            self._forget(device.id)
            conn = await self._connect(device, opts)
            self._conns[device.id] = (key, conn)
            return conn

    def _forget(self, device_id: str, conn: asyncssh.SSHClientConnection | None = None) -> None:
        """Drop (and close) the device's cached connection; with `conn`, only if that is the one cached."""
        cached = self._conns.get(device_id)
        if cached is not None and (conn is None or cached[1] is conn):
            del self._conns[device_id]
            cached[1].close()

    async def _connect(self, device: Device, opts: p.Options) -> asyncssh.SSHClientConnection:
        where = f"{device.id}: {opts.host}:{opts.port}"
        auth = self._auth(device)
        try:
            return await asyncssh.connect(
                opts.host, opts.port, username=opts.username, known_hosts=_trusted_keys(device, opts),
                config=None, agent_path=None, gss_host=None, host_based_auth=False, x509_trusted_certs=None,
                keepalive_interval=KEEPALIVE_SECONDS, keepalive_count_max=3, **auth)
        except asyncssh.HostKeyNotVerifiable:
            raise ConfigError(f"{where}: the host key does not match {_key_source(opts)}: refused (if the device "
                              f"was reinstalled, check its new key out of band and update the option)") from None
        except asyncssh.KeyExchangeFailed as exc:
            raise ConfigError(f"{where}: key exchange failed ({clean(exc.reason, 200)}); a host key type other "
                              f"than the one in {_key_source(opts)} is one cause") from None
        except asyncssh.PermissionDenied:
            raise ConfigError(f"{where}: user {opts.username!r} was refused with credential "
                              f"{device.credential!r}: fix that credential or the device's authorised keys"
                              f"{p.refused_hint(opts, auth['password'] is not None)}") from None
        except asyncssh.DisconnectError as exc:
            raise TransientError(f"{where}: {type(exc).__name__}: {clean(exc.reason, 200)}") from None
        except TimeoutError:
            raise  # the operation's deadline: _bounded reports it (TimeoutError is an OSError too)
        except OSError as exc:
            raise UnreachableError(f"{where}: cannot connect: {clean(exc.strerror or exc, 200)}") from None

    def _auth(self, device: Device) -> dict[str, Any]:
        """Key or password from the credential file; never the secret in an error."""
        if not device.credential or self._context.credentials is None:
            raise ConfigError(f"{device.id}: ssh needs a credential (a private key or a password) and a store")
        secret = self._context.credentials.get(device.credential)
        none: dict[str, Any] = {"password": None, "kbdint_auth": False, "client_keys": None}
        if not p.is_private_key(secret):
            return {**none, "password": secret, "kbdint_auth": True}
        try:
            key = asyncssh.import_private_key(secret)
        except (asyncssh.KeyImportError, ValueError):
            raise ConfigError(f"{device.id}: credential {device.credential!r} is not a private key asyncssh can "
                              f"read (encrypted keys are not supported: store it without a passphrase)") from None
        return {**none, "client_keys": [key]}


def _trusted_keys(device: Device, opts: p.Options) -> Any:
    """The host keys to trust, from known_hosts or host_key: asyncssh matches them, never accepts blindly."""
    try:
        if opts.host_keys:
            return ([asyncssh.import_public_key(k) for k in opts.host_keys], [], [])
        assert opts.known_hosts is not None
        return asyncssh.read_known_hosts(opts.known_hosts)
    except (OSError, ValueError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"{device.id}: {_key_source(opts)} cannot be used: {clean(exc, 200)}") from None


def _key_source(opts: p.Options) -> str:
    return "the host_key option" if opts.host_keys else f"known_hosts {clean(opts.known_hosts, 200)}"

