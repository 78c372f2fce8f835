"""`radius`: subscribers of a NAS that asks FreeRADIUS (rlm_sql) whom to let in. off = the user's row in the
suspended group sorts first in `radusergroup`, and the live session is ended (Disconnect-Request) or changed
(CoA-Request) through the NAS's Dynamic Authorization Server (RFC 5176); on = that row is gone, and the
session is ended so it comes back under the normal policy (or changed back, or left: `restore`).

The device is the NAS: address host[:port] of its DAS (UDP 3799 by default), credential = its shared
secret; the option policy_credential names the credential that holds the store's DSN. Service key
`user/<username>`. Options and meanings: radius_proto; the store: radius_policy (PostgreSQL) and radius_mysql
(MySQL/MariaDB), their SQL in radius_sql; the UDP: radius_das.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from agent.drivers import radius_das as das
from agent.drivers import radius_proto as p
from agent.drivers.base import DriverContext
from agent.drivers.radius_policy import Store, open_store
from agent.errors import AgentError, ConfigError, NoAnswerError, PermanentError
from agent.model.device import Device, State
from agent.text import clean

T = TypeVar("T")
SETTLE_POLL = 0.1   # seconds between looks at radacct while the NAS's Accounting-Stop is on its way
MARGIN = 0.2        # seconds past an operation's timeout before the safety net cuts it


class RadiusDriver:
    name = "radius"

    def __init__(self, context: DriverContext | None = None) -> None:
        self._context = context or DriverContext()
        self._stores: dict[str, Store] = {}

    def validate_options(self, device: Device) -> None:
        opts = self._options(device)
        das.check_attributes(opts.coa_attributes)
        das.check_attributes(opts.restore_coa_attributes)
        if not device.credential:
            raise ConfigError("radius: the device needs a credential (the NAS's shared secret)")

    async def read(self, device: Device, service: str) -> State:
        user = p.parse_service(service)
        opts = self._options(device)
        store = await self._store(opts)
        policies = await self._bounded(device, opts.timeout, lambda: store.read([user], opts.nas_ip, opts.accounting,
                                                                               opts.timeout))
        return p.state_of(policies[user], opts, f"{device.id}: {service}")

    def can_read_many(self, device: Device) -> bool:
        return True

    async def read_many(self, device: Device, services: Sequence[str]) -> dict[str, State | AgentError]:
        """Every service's policy and sessions in one query; a bad key or an unknown user fails alone."""
        users, bad = _users(services)
        out: dict[str, State | AgentError] = dict(bad)
        opts = self._options(device)
        store = await self._store(opts)
        policies = await self._policies(device, store, opts, users)
        for service, user in users.items():
            try:
                out[service] = p.state_of(policies[user], opts, f"{device.id}: {service}")
            except PermanentError as exc:
                out[service] = exc
        return out

    async def apply(self, device: Device, service: str, state: State) -> None:
        user = p.parse_service(service)
        opts = self._options(device)
        nas = self._nas(device, opts)
        store = await self._store(opts)
        what = f"{device.id}: {clean(service, 120)} {state}"
        deadline = asyncio.get_running_loop().time() + opts.timeout
        await self._bounded(device, opts.timeout, lambda: self._apply(store, nas, opts, user, state, what, deadline))

    async def apply_many(self, device: Device, wanted: Mapping[str, State]) -> dict[str, AgentError | None]:
        """A take's writes (month-end: hundreds of suspensions on one NAS) as one policy change: one read of
        every user's policy, one statement for all the suspended rows (and one for the restored), then
        each user's sessions, `max_parallel` users at a time, each user's exchange within `timeout`.
        Per service None (written) or the error that service alone met."""
        users, bad = _users(wanted)
        out: dict[str, AgentError | None] = dict(bad)
        if not users:
            return out
        opts = self._options(device)
        nas = self._nas(device, opts)
        store = await self._store(opts)
        policies = await self._policies(device, store, opts, users)
        plans: dict[str, tuple[tuple[str, int] | None, tuple[int, p.Attributes] | None]] = {}
        for service, user in users.items():
            try:
                plans[service] = self._plan(policies[user], wanted[service], opts, f"{device.id}: {service}")
            except AgentError as exc:
                out[service] = exc
        suspend = {users[s]: row[1] for s, (row, _) in plans.items() if row is not None and row[0] == "suspend"}
        restore = sorted({users[s] for s, (row, _) in plans.items() if row is not None and row[0] == "restore"})

        async def rows() -> None:
            if suspend:
                await self._check_group(store, opts, f"{device.id}: {len(suspend)} suspension(s)")
                await store.suspend_many(sorted(suspend.items()), opts.suspended_group, opts.timeout)
            if restore:
                await store.restore_many(restore, opts.suspended_group, opts.timeout)

        try:
            await self._bounded(device, opts.timeout, rows)
        except AgentError as exc:  # the policy statement failed: no service of the take was written
            return out | dict.fromkeys(plans, exc)
        gate = asyncio.Semaphore(_max_parallel(device))

        async def sessions(service: str, request: tuple[int, p.Attributes]) -> None:
            async with gate:
                what = f"{device.id}: {clean(service, 120)} {wanted[service]}"
                deadline = asyncio.get_running_loop().time() + opts.timeout
                try:
                    await self._bounded(device, opts.timeout, lambda: self._sessions(
                        store, nas, opts, policies[users[service]], request, what, deadline))
                except AgentError as exc:
                    out[service] = exc

        await asyncio.gather(*(sessions(s, req) for s, (_, req) in plans.items() if req is not None))
        return {service: out.get(service) for service in wanted}

    async def _policies(self, device: Device, store: Store, opts: p.Options,
                        users: dict[str, str]) -> dict[str, p.Policy]:
        """Every user's policy (and open sessions on this NAS) in one query."""
        return await self._bounded(device, opts.timeout, lambda: store.read(
            list(dict.fromkeys(users.values())), opts.nas_ip, opts.accounting, opts.timeout))

    async def probe(self, device: Device) -> None:
        """Both halves: the store answers and the suspended group holds a policy; the NAS answers a
        Disconnect-Request, signed with the shared secret, for a user it has no session of (NAK 503)."""
        opts = self._options(device)
        nas = self._nas(device, opts)
        store = await self._store(opts)

        deadline = asyncio.get_running_loop().time() + opts.timeout

        async def both() -> None:
            if not await store.group_defined(opts.suspended_group, opts.timeout):
                raise ConfigError(f"{device.id}: the group {opts.suspended_group!r} has no radgroupcheck or "
                                  f"radgroupreply row: a suspension into it suspends nobody (give it e.g. "
                                  f"Auth-Type := Reject in radgroupcheck)")
            what = f"{device.id}: probe (Disconnect-Request for {p.PROBE_USER})"
            reply = await das.exchange(nas, p.DISCONNECT_REQUEST,
                                       p.session_attributes(p.PROBE_USER, opts.nas_ip, None), what, deadline)
            if (error := p.nak_error(reply.code, reply.causes, what)) is not None:
                raise error

        await self._bounded(device, opts.timeout, both)

    async def close(self) -> None:
        stores = list(self._stores.values())
        self._stores.clear()
        for store in stores:
            await store.close()

    # -- operations ----------------------------------------------------------------------

    async def _apply(self, store: Store, nas: das.Target, opts: p.Options, user: str, state: State,
                     what: str, deadline: float) -> None:
        policy = (await store.read([user], opts.nas_ip, opts.accounting, opts.timeout))[user]
        row, request = self._plan(policy, state, opts, what)
        if row is not None and row[0] == "suspend":
            await self._check_group(store, opts, what)
            await store.suspend(user, opts.suspended_group, row[1], opts.timeout)
        elif row is not None:
            await store.restore(user, opts.suspended_group, opts.timeout)
        if request is not None:
            await self._sessions(store, nas, opts, policy, request, what, deadline)

    def _plan(self, policy: p.Policy, state: State, opts: p.Options,
              what: str) -> tuple[tuple[str, int] | None, tuple[int, p.Attributes] | None]:
        """What bringing the user to `state` takes: the policy row to write (("suspend", priority) or
        ("restore", 0), or None) and the request for the user's sessions (None: leave them)."""
        if not policy.known:
            p.state_of(policy, opts, what)  # raises: no such subscriber
        group = opts.suspended_group
        if state == "off":
            row = None if p.suspended(policy, group) else ("suspend", p.suspend_priority(policy, group))
            return row, ((p.DISCONNECT_REQUEST, ()) if opts.suspend == "disconnect"
                         else (p.COA_REQUEST, opts.coa_attributes))
        if not any(g == group for g, _ in policy.groups):
            return None, None  # not suspended here: nothing to restore, no session to end
        request = (None if opts.restore == "none" else (p.DISCONNECT_REQUEST, ()) if opts.restore == "disconnect"
                   else (p.COA_REQUEST, opts.restore_coa_attributes))
        return ("restore", 0), request

    async def _check_group(self, store: Store, opts: p.Options, what: str) -> None:
        if not await store.group_defined(opts.suspended_group, opts.timeout):
            raise ConfigError(f"{what}: the group {opts.suspended_group!r} has no radgroupcheck or radgroupreply "
                              "row: a suspension into it would suspend nobody")

    async def _sessions(self, store: Store, nas: das.Target, opts: p.Options, policy: p.Policy,
                        request: tuple[int, p.Attributes], what: str, deadline: float) -> None:
        """End (or change) each open session; without accounting, or none known, the user's by User-Name."""
        code, extra = request
        sessions: Sequence[p.Session | None] = policy.sessions or [None]
        replies = await asyncio.gather(*(
            das.exchange(nas, code, p.session_attributes(policy.user, opts.nas_ip, s) + extra, what, deadline)
            for s in sessions))
        ended = []
        for session, reply in zip(sessions, replies, strict=True):
            if (error := p.nak_error(reply.code, reply.causes, what)) is not None:
                raise error
            if session is None:
                continue
            if reply.code in p.NAKS:  # 503: the NAS has no such session; its Accounting-Stop was lost
                await store.close_stale(session.radacct_id, opts.timeout)
            elif code == p.DISCONNECT_REQUEST:
                ended.append(session.radacct_id)
        if ended and opts.settle:
            await self._settle(store, opts, ended, deadline)

    async def _settle(self, store: Store, opts: p.Options, radacct_ids: list[int], deadline: float) -> None:
        """Wait (at most `settle` seconds, and within the operation's timeout) for the NAS's Accounting-Stop
        of the sessions it ended, so that the read-back sees them closed; past that the read-back says so
        and the command is retried (the NAS then answers 503 and the driver closes the stale rows)."""
        loop = asyncio.get_running_loop()
        end = min(loop.time() + opts.settle, deadline - SETTLE_POLL)
        while loop.time() < end and await store.still_open(radacct_ids, opts.timeout):
            await asyncio.sleep(SETTLE_POLL)

    # -- set-up --------------------------------------------------------------------------

    def _options(self, device: Device) -> p.Options:
        return p.parse_options(device.options, device.address, self._context.device_timeout)

    def _nas(self, device: Device, opts: p.Options) -> das.Target:
        host, port = p.parse_address(device.address)
        if not device.credential or self._context.credentials is None:
            raise ConfigError(f"{device.id}: radius needs a credential (the NAS's shared secret) and a store")
        secret = p.shared_secret(self._context.credentials.get(device.credential), device.credential)
        return das.Target(host, port, secret, device.credential, opts.timeout, opts.retries)

    async def _store(self, opts: p.Options) -> Store:
        """One store per policy credential, made again when the DSN in it changes."""
        if self._context.credentials is None:
            raise ConfigError("radius needs a credential store (for policy_credential)")
        dsn = self._context.credentials.get(opts.policy_credential)
        if not dsn:
            raise ConfigError(f"radius: credential {opts.policy_credential!r} is empty (it must hold the DSN)")
        store = self._stores.get(opts.policy_credential)
        if store is not None and store.dsn == dsn:
            return store
        if store is not None:
            await store.close()
        store = self._stores[opts.policy_credential] = open_store(dsn, opts.policy_credential)
        return store

    async def _bounded(self, device: Device, seconds: float, op: Callable[[], Awaitable[T]]) -> T:
        """The whole operation within `seconds` (and a little more, so that the exchange's own error, which
        says what was silent, is the one raised when the NAS is)."""
        try:
            async with asyncio.timeout(seconds + MARGIN):
                return await op()
        except TimeoutError:
            raise NoAnswerError(f"{device.id}: no answer from the policy store or the NAS within {seconds:g}s") \
                from None


def _max_parallel(device: Device) -> int:
    """The NAS's `max_parallel` (the agent's device option: requests in flight at once), default 1."""
    value = device.options.get("max_parallel", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def _users(services: Iterable[str]) -> tuple[dict[str, str], dict[str, PermanentError]]:
    """service -> user for the valid keys, and the error of each key that is not one (pure)."""
    users: dict[str, str] = {}
    bad: dict[str, PermanentError] = {}
    for service in services:
        try:
            users[service] = p.parse_service(service)
        except PermanentError as exc:
            bad[service] = exc
    return users, bad
