"""The RouterOS API wire codec (agent/drivers/routeros_api.py): words at every length-prefix boundary,
sentences that arrive in pieces, replies, the two logins. Cross-checked where it can be against
librouteros (GPL-2.0+, installed by the `test` extra only, never imported by the agent)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from librouteros.login import encode_password
from librouteros.protocol import decode_length as lib_decode_length
from librouteros.protocol import encode_length as lib_encode_length

from agent.drivers.routeros_api import (
    Budget,
    Connection,
    Fatal,
    ProtocolError,
    ReplyTooLong,
    Trap,
    decode_length,
    encode_length,
    encode_sentence,
    login_response,
    parse_sentence,
    prefix_size,
    read_sentence,
    read_word,
)

# (length, its prefix): both sides of every boundary MikroTik's API page names
BOUNDARIES = [
    (0, "00"), (1, "01"), (0x7F, "7f"),
    (0x80, "8080"), (0x3FFF, "bfff"),
    (0x4000, "c04000"), (0x1FFFFF, "dfffff"),
    (0x200000, "e0200000"), (0xFFFFFFF, "efffffff"),
    (0x10000000, "f010000000"), (0xFFFFFFFF, "f0ffffffff"),
]


@pytest.mark.parametrize(("n", "prefix"), BOUNDARIES)
def test_every_length_prefix_boundary_encodes_and_decodes(n: int, prefix: str) -> None:
    raw = bytes.fromhex(prefix)
    assert encode_length(n) == raw
    assert prefix_size(raw[0]) == len(raw)
    assert decode_length(raw) == n


@pytest.mark.parametrize(("n", "prefix"), [b for b in BOUNDARIES if b[0] < 0x10000000])
def test_prefixes_agree_with_librouteros(n: int, prefix: str) -> None:
    assert lib_encode_length(n) == encode_length(n)
    assert lib_decode_length(encode_length(n)) == n


def test_control_bytes_and_impossible_lengths_are_refused() -> None:
    for first in (0xF1, 0xF8, 0xFF):
        with pytest.raises(ProtocolError, match="control byte"):
            prefix_size(first)
    with pytest.raises(ProtocolError, match="has 2 bytes"):
        decode_length(b"\x80")
    with pytest.raises(ValueError):
        encode_length(1 << 32)


def test_a_sentence_is_words_and_an_empty_word() -> None:
    assert encode_sentence(["/login", "=name=agent"]) == b"\x06/login\x0b=name=agent\x00"
    long = "=comment=" + "é" * 100  # 209 bytes in UTF-8: a two-byte prefix
    assert encode_sentence([long])[:2] == (0x8000 | len(long.encode())).to_bytes(2, "big")


def reader_of(data: bytes, piece: int | None = None) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    if piece is None:
        reader.feed_data(data)
        reader.feed_eof()
    else:  # the bytes arrive in pieces, as through a WAN link, one task step apart
        async def feed() -> None:
            for i in range(0, len(data), piece):
                reader.feed_data(data[i:i + piece])
                await asyncio.sleep(0)
            reader.feed_eof()
        asyncio.get_running_loop().create_task(feed())
    return reader


@pytest.mark.parametrize(("piece", "big"), [(None, 0x200000), (65543, 0x200000), (1, 0x4000), (2, 0x4000),
                                          (3, 0x4000)])
async def test_words_of_every_prefix_size_are_read_whole_however_they_arrive(piece: int | None, big: int) -> None:
    words = ["!re", "=a=" + "x" * 0x80, "=b=" + "y" * big, ".tag=1"]
    assert await read_sentence(reader_of(encode_sentence(words), piece), Budget(1 << 24)) == words


async def test_a_cut_reply_is_an_incomplete_read_not_a_short_word() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await read_word(reader_of(encode_length(10) + b"abc"), Budget(100))


async def test_the_budget_refuses_a_huge_word_before_reading_it() -> None:
    with pytest.raises(ReplyTooLong):
        await read_word(reader_of(b"\xf0\xff\xff\xff\xff"), Budget(1 << 20))  # nothing follows: not waited for


def test_non_utf8_and_control_bytes_in_values_are_kept_readable() -> None:
    async def go() -> list[str]:
        return await read_sentence(reader_of(encode_length(9) + b"=c=\xe9t\xe9\x1b[x" + b"\x00"), Budget(100))
    assert asyncio.run(go()) == ["=c=\ufffdt\ufffd\x1b[x"]


def test_reply_sentences_parse_attributes_tags_and_fatal() -> None:
    re = parse_sentence(["!re", "=.id=*1A", "=name=alice", "=comment=a=b", ".tag=3"])
    assert (re.reply, re.attrs, re.tag) == ("!re", {".id": "*1A", "name": "alice", "comment": "a=b"}, "3")
    assert parse_sentence(["!fatal", "session terminated on request"]).text == "session terminated on request"
    assert parse_sentence(["!done", "=ret=*5"]).attrs == {"ret": "*5"}
    for bad in ([], ["!what"], ["!re", "name=alice"]):
        with pytest.raises(ProtocolError):
            parse_sentence(bad)


def test_challenge_login_response_is_md5_of_zero_password_and_challenge() -> None:
    challenge = "ebddd18303a54111e2dea05a92ab46b4"  # the documentation's example challenge
    expected = "00" + hashlib.md5(b"\x00" + b"secret" + bytes.fromhex(challenge)).hexdigest()
    assert login_response("secret", challenge) == expected == encode_password(challenge, "secret")
    with pytest.raises(ProtocolError):
        login_response("secret", "not hex")


class Wire:
    """A StreamWriter stand-in that records what is sent and answers from a script."""

    def __init__(self, reader: asyncio.StreamReader, answers: list[list[list[str]]]) -> None:
        self.reader, self.answers, self.sent = reader, answers, []  # type: list[list[str]]
        self.closed = False

    def write(self, data: bytes) -> None:
        words, i = [], 0
        while data[i]:
            size = prefix_size(data[i])
            n = decode_length(data[i:i + size])
            words.append(data[i + size:i + size + n].decode())
            i += size + n
        self.sent.append(words)
        tag = next(w for w in words if w.startswith(".tag="))
        for sentence in self.answers.pop(0):
            if sentence == ["<eof>"]:  # the router closes the connection here
                self.reader.feed_eof()
                continue
            own = sentence[0] == "!fatal" or any(w.startswith(".tag=") for w in sentence)
            self.reader.feed_data(encode_sentence(sentence if own else [*sentence, tag]))

    async def drain(self) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return None


def connection(answers: list[list[list[str]]]) -> tuple[Connection, Wire]:
    reader = asyncio.StreamReader()
    wire = Wire(reader, answers)
    return Connection(reader, wire, 1 << 20), wire  # type: ignore[arg-type]


async def test_plain_login_of_643_and_later_is_one_command() -> None:
    conn, wire = connection([[["!done"]]])
    await conn.login("agent", "pw")
    assert [w[:-1] for w in wire.sent] == [["/login", "=name=agent", "=password=pw"]]


async def test_a_challenge_gets_the_pre_643_response() -> None:
    challenge = "ebddd18303a54111e2dea05a92ab46b4"
    conn, wire = connection([[["!done", f"=ret={challenge}"]], [["!done"]]])
    await conn.login("agent", "pw")
    assert wire.sent[1][:-1] == ["/login", "=name=agent", f"=response={login_response('pw', challenge)}"]


async def test_a_trap_is_raised_after_its_done_and_the_connection_stays_usable() -> None:
    conn, _ = connection([[["!trap", "=category=0", "=message=no such item"], ["!done"]],
                          [["!re", "=.id=*1", "=name=a"], ["!re", "=.id=*2", "=name=b"], ["!done"]],
                          [["!empty"], ["!done"]]])
    with pytest.raises(Trap) as trap:
        await conn.call(["/ppp/secret/set", "=.id=*9", "=disabled=yes"])
    assert (trap.value.message, trap.value.category) == ("no such item", "0") and conn.usable
    reply = await conn.call(["/ppp/secret/print"])
    assert reply.rows == [{".id": "*1", "name": "a"}, {".id": "*2", "name": "b"}]
    assert (await conn.call(["/ppp/secret/print", "?name=x"])).rows == []


async def test_fatal_and_a_too_long_reply_close_the_connection() -> None:
    conn, wire = connection([[["!fatal", "session terminated on request"]]])
    with pytest.raises(Fatal, match="terminated"):
        await conn.call(["/system/resource/print"])
    assert not conn.usable and wire.closed
    small, wire = connection([[["!re", "=name=" + "x" * 2000], ["!done"]]])
    small._max_reply = 1024
    with pytest.raises(ReplyTooLong):
        await small.call(["/ppp/secret/print"])
    assert not small.usable


async def test_a_trap_the_router_closes_after_is_still_the_trap() -> None:
    conn, _ = connection([[["!trap", "=message=invalid user name or password (6)"], ["<eof>"]]])  # no !done
    with pytest.raises(Trap, match="invalid user name"):
        await conn.login("agent", "wrong")
    assert not conn.usable


async def test_replies_to_another_tag_are_skipped() -> None:
    conn, _ = connection([[["!re", "=name=stale", ".tag=99"], ["!re", "=name=mine"], ["!done"]]])
    reply = await conn.call(["/ppp/secret/print"])
    assert reply.rows == [{"name": "mine"}]


# -- librouteros stays a test tool --------------------------------------------------------------

def runtime_closure() -> set[str]:
    """The distributions the agent's packages ship: pyproject's dependencies and its `systemd` extra (what
    scripts/build-wheels builds), and, as installed here, everything they require in turn."""
    import importlib.metadata
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["systemd"]]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in importlib.metadata.requires(req.name) or []]
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed here (systemd-python without libsystemd): its name is still counted
    return seen


def test_librouteros_is_only_a_test_tool() -> None:
    """librouteros is GPL-2.0-or-later: it may check our codec and stand-in, never ship with the agent."""
    import ast
    from pathlib import Path

    shipped = runtime_closure()
    assert {"aiohttp", "asyncssh", "multidict"} <= shipped  # the walk follows dependencies of dependencies
    assert "librouteros" not in shipped
    agent = Path(__file__).resolve().parents[2] / "agent"
    importers = []
    for path in agent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "librouteros" for n in names):
                importers.append(str(path.relative_to(agent.parent)))
    assert importers == []
