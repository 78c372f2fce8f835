"""A fake MikroTik RouterOS API service (TCP 8728 / TLS 8729), written from MikroTik's API documentation
(help.mikrotik.com, "API"), over the same in-memory router as the REST fake (routeros_fake.RouterOsFake):
what one protocol changes, the other sees. It is NOT a router: tests that use it are marked
`fake_backed`, and tests/drivers/test_routeros_api.py runs librouteros (an independent client,
test-only) against it so that it is not only our reading of the documentation.

What it follows from the documentation:
  - words are a length prefix (1-5 bytes) and bytes; a sentence ends with an empty word. Its codec is
    written separately from the agent's (agent/drivers/routeros_api.py), with bit masks, not tables.
  - login: `/login =name= =password=` (6.43 and later), or with login="challenge" the older one:
    `/login` answers `!done =ret=<challenge>`, then `/login =name= =response=00<md5(0 + password +
    challenge)>`. A refused login is `!trap =message=invalid user name or password (6)`. Before a
    login every other command is refused ("not logged in").
  - `/<menu>/print` with `=.proplist=a,b` and query words (`?name=x`, `?=name=x`, `?-name`, `?name`,
    `?#|`, `?#&`, `?#!`, stack indexes), one `!re` per item, then `!done`; from RouterOS 7.18 (set
    `version`) an empty result is `!empty` then `!done`.
  - `/<menu>/set =.id=*X =f=v`, `/<menu>/add =f=v` (`!done =ret=*X`), `/<menu>/remove =.id=*X`;
    an unknown `.id` is `!trap =message=no such item`; an unknown menu `no such command prefix`; a
    command a menu lacks `no such command`; a bad argument `!trap =category=1`.
  - every reply sentence carries the command's `.tag`; `/quit` and `fatal_next` end the session with
    `!fatal <reason>` and close the connection; a reboot of the router drops every connection.
Guesses, not documented: the exact trap texts beyond those named; "not logged in" as a trap.

Test knobs: `fatal_next` (a reason: the next command gets !fatal), `traps` (canned (command or "*", message,
category), each served once to the next such command other than /login), `chunk` (write replies in pieces of
that many bytes, draining between), `commands` (what was asked, passwords masked), `logins`,
`connections` (accepted), drop() (close every connection, as a reboot does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
from typing import Any

from tests.support.routeros_fake import MENUS, BadRequest, Cert, RouterOsFake, matches, one_of, shown

Words = list[str]


async def read_length(reader: asyncio.StreamReader) -> int:
    b = (await reader.readexactly(1))[0]
    if b & 0x80 == 0x00:
        return b
    if b & 0xC0 == 0x80:
        return (b & 0x3F) << 8 | (await reader.readexactly(1))[0]
    if b & 0xE0 == 0xC0:
        return (b & 0x1F) << 16 | int.from_bytes(await reader.readexactly(2), "big")
    if b & 0xF0 == 0xE0:
        return (b & 0x0F) << 24 | int.from_bytes(await reader.readexactly(3), "big")
    if b == 0xF0:
        return int.from_bytes(await reader.readexactly(4), "big")
    raise ValueError(f"control byte {b:#x}")


def length_bytes(n: int) -> bytes:
    for size, marker in ((1, 0x00), (2, 0x80), (3, 0xC0), (4, 0xE0)):
        if n < 1 << (7 * size):
            return (n | marker << (8 * (size - 1))).to_bytes(size, "big")
    return bytes([0xF0]) + n.to_bytes(4, "big")


def sentence_bytes(words: Words) -> bytes:
    out = bytearray()
    for word in words:
        data = word.encode()
        out += length_bytes(len(data)) + data
    return bytes(out + b"\x00")


class Fatal(Exception):
    pass


class RouterOsApiFake:
    def __init__(self, router: RouterOsFake, login: str = "plain") -> None:
        assert login in ("plain", "challenge")
        self.router, self.login = router, login
        self.fatal_next: str | None = None
        self.traps: list[tuple[str, str, str]] = []
        self.chunk: int | None = None
        self.commands: list[Words] = []
        self.logins = 0
        self.connections = 0
        self.address = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        router.on_reboot.append(self.drop)

    async def start(self, tls: Cert | None = None, host: str = "127.0.0.1") -> RouterOsApiFake:
        self._server = await asyncio.start_server(self._serve, host, 0, ssl=tls.context() if tls else None)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{'api-ssl' if tls else 'api'}://{host}:{port}"
        return self

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    def drop(self) -> None:
        for writer in list(self._writers):
            writer.close()

    # -- the wire ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        session: dict[str, Any] = {"user": None, "challenge": None}
        try:
            while True:
                words: Words = []
                while n := await read_length(reader):
                    words.append((await reader.readexactly(n)).decode("utf-8", "replace"))
                if not words:
                    continue
                tag = next((w[5:] for w in words if w.startswith(".tag=")), None)
                try:
                    replies = self._answer(words, session)
                except Fatal as fatal:
                    await self._send(writer, [["!fatal", str(fatal)]], None)
                    break
                await self._send(writer, replies, tag)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, replies: list[Words], tag: str | None) -> None:
        data = b"".join(sentence_bytes(r + ([f".tag={tag}"] if tag is not None else [])) for r in replies)
        if self.router.delay:
            await asyncio.sleep(self.router.delay)
        step = self.chunk or len(data)
        for i in range(0, len(data), step):
            writer.write(data[i:i + step])
            await writer.drain()

    # -- commands ------------------------------------------------------------------------

    def _answer(self, words: Words, session: dict[str, Any]) -> list[Words]:
        command = words[0]
        attrs: dict[str, str] = {}
        query: Words = []
        for word in words[1:]:
            if word.startswith("="):
                name, _, value = word[1:].partition("=")
                attrs[name] = value
            elif word.startswith("?"):
                query.append(word[1:])
            elif not word.startswith(".tag="):
                return trap(f"unknown parameter {word}", "1")
        self.commands.append([command] + [f"={k}={'***' if k in ('password', 'response') else v}"
                                          for k, v in attrs.items()] + [f"?{q}" for q in query])
        if command == "/quit":
            raise Fatal("session terminated on request")
        if self.fatal_next is not None:
            reason, self.fatal_next = self.fatal_next, None
            raise Fatal(reason)
        if command == "/login":
            return self._login(attrs, session)
        if session["user"] is None:
            return trap("not logged in", "5")
        for i, (which, message, category) in enumerate(self.traps):
            if which in ("*", command):
                del self.traps[i]
                return trap(message, category)
        try:
            return self._run(command, attrs, query)
        except BadRequest as exc:
            if exc.status == 404:
                return trap("no such item", "0")
            return trap(str(exc.detail or "failure"), "0" if exc.status == 406 else "1")

    def _login(self, attrs: dict[str, str], session: dict[str, Any]) -> list[Words]:
        user, password = self.router.username, self.router.password
        if self.login == "plain":
            if attrs.get("name") == user and attrs.get("password") == password:
                session["user"] = user
                self.logins += 1
                return [["!done"]]
            return trap("invalid user name or password (6)")
        if "response" not in attrs:  # RouterOS before 6.43 ignores name and password here
            session["challenge"] = secrets.token_bytes(16)
            return [["!done", f"=ret={session['challenge'].hex()}"]]
        challenge, session["challenge"] = session["challenge"], None
        good = challenge is not None and attrs.get("name") == user and attrs["response"] == "00" + hashlib.md5(
            b"\x00" + password.encode() + challenge).hexdigest()
        if not good:
            return trap("cannot log in")
        session["user"] = user
        self.logins += 1
        return [["!done"]]

    def _run(self, command: str, attrs: dict[str, str], query: Words) -> list[Words]:
        menu, _, verb = command.strip("/").rpartition("/")
        if menu in ("system/resource", "system/identity") and verb == "print":
            row = {"name": "MikroTik"} if menu.endswith("identity") else {
                "version": self.router.version, "uptime": f"{self.router.boots}m", "board-name": "CHR"}
            return [["!re", *(f"={k}={v}" for k, v in row.items())], ["!done"]]
        if not self.router.has_menu(menu):
            return trap("no such command prefix", "0")
        if verb == "print":
            proplist = attrs[".proplist"].split(",") if ".proplist" in attrs else None
            any_of = one_of(query)  # many names at once: a set lookup, as the REST fake does
            rows = [shown(r, proplist) for r in self.router.tables[menu]
                    if (r.get(any_of[0]) in any_of[1] if any_of else matches(r, query))]
            if not rows and self._empty_reply():
                return [["!empty"], ["!done"]]
            return [["!re", *(f"={k}={v}" for k, v in r.items())] for r in rows] + [["!done"]]
        fields = {k: v for k, v in attrs.items() if k != ".id"}
        if verb == "set":
            self.router.set_item(menu, attrs.get(".id", ""), fields)
            return [["!done"]]
        if verb == "add":
            return [["!done", f"=ret={self.router.add_item(menu, fields)['.id']}"]]
        if verb == "remove":
            if "remove" not in MENUS[menu][0]:
                return trap("no such command", "0")
            self.router.remove_item(menu, attrs.get(".id", ""))
            return [["!done"]]
        return trap("no such command", "0")

    def _empty_reply(self) -> bool:
        return tuple(int(n) for n in re.findall(r"\d+", self.router.version)[:2]) >= (7, 18)


def trap(message: str, category: str | None = None) -> list[Words]:
    return [["!trap", *([f"=category={category}"] if category else []), f"=message={message}"], ["!done"]]
