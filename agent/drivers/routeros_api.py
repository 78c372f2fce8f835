"""The RouterOS API wire (TCP 8728, TLS 8729; RouterOS v6 and v7): words, sentences, replies, login.

From MikroTik's API documentation (help.mikrotik.com, "API"):
  - a *word* is a length prefix and that many bytes. The prefix is 1 byte below 0x80, 2 bytes
    (`0x80|len`) below 0x4000, 3 bytes (`0xC0|len`) below 0x200000, 4 bytes (`0xE0|len`) below
    0x10000000, else 0xF0 and 4 bytes of length. First bytes 0xF8-0xFF are reserved control bytes.
  - a *sentence* is words ended by an empty word (one 0x00 byte). A command sentence starts with the
    command path (`/ppp/secret/print`), then attribute words `=name=value`, API attributes
    (`.tag=7`, `=.proplist=a,b`) and query words (`?name=alice`, `?-name`, `?#|`).
  - replies: `!re` (one item, its fields as `=name=value`), `!done` (the end, maybe with `=ret=`),
    `!trap` (`=message=`, maybe `=category=`; `!done` follows), `!empty` (v7.18+: nothing found;
    `!done` follows), `!fatal` (one word, the reason; the router closes the connection).
    Every reply sentence to a command sent with `.tag=N` carries `.tag=N`.
  - login (6.43 and later): `/login =name=U =password=P`. Older releases answer that with
    `!done =ret=<challenge hex>` and want `/login =name=U =response=00<md5(0x00 + P + challenge) hex>`.

Pure encode/decode functions plus `Connection`, one logged-in API session on asyncio streams that runs
one command at a time. It raises `Trap`, `Fatal`, `ProtocolError`, `ReplyTooLong` and the stream's own
errors (OSError, asyncio.IncompleteReadError, TimeoutError); routeros.py maps them to agent errors.
Text is UTF-8 on the way out and decoded with replacement on the way in (RouterOS may send other
encodings inside values).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

Attrs = dict[str, str]
MAX_LENGTH = 0xFFFFFFFF


class ProtocolError(Exception):
    """The peer sent something that is not the RouterOS API."""


class ReplyTooLong(Exception):
    """The reply to one command exceeds the caller's byte limit."""


class Trap(Exception):
    """`!trap`: the router refused the command; the connection stays usable."""

    def __init__(self, message: str, category: str | None = None) -> None:
        super().__init__(message)
        self.message, self.category = message, category


class Fatal(Exception):
    """`!fatal`: the router closes the connection."""


# -- words -----------------------------------------------------------------------------------

def encode_length(n: int) -> bytes:
    if n < 0:
        raise ValueError("a word length cannot be negative")
    if n < 0x80:
        return bytes([n])
    if n < 0x4000:
        return (n | 0x8000).to_bytes(2, "big")
    if n < 0x200000:
        return (n | 0xC00000).to_bytes(3, "big")
    if n < 0x10000000:
        return (n | 0xE0000000).to_bytes(4, "big")
    if n <= MAX_LENGTH:
        return b"\xf0" + n.to_bytes(4, "big")
    raise ValueError(f"a word of {n} bytes cannot be sent")


def prefix_size(first: int) -> int:
    """How many bytes the length prefix starting with `first` has."""
    if first < 0x80:
        return 1
    if first < 0xC0:
        return 2
    if first < 0xE0:
        return 3
    if first < 0xF0:
        return 4
    if first == 0xF0:
        return 5
    raise ProtocolError(f"control byte 0x{first:02X} where a word length was expected")


def decode_length(prefix: bytes) -> int:
    """The length a whole prefix (as long as `prefix_size` of its first byte says) encodes."""
    size = prefix_size(prefix[0])
    if len(prefix) != size:
        raise ProtocolError(f"a length prefix starting with 0x{prefix[0]:02X} has {size} bytes, not {len(prefix)}")
    if size == 5:
        return int.from_bytes(prefix[1:], "big")
    mask = (1 << (7 * size)) - 1  # the bits left after the 1-4 marker bits
    return int.from_bytes(prefix, "big") & mask


def encode_word(word: str) -> bytes:
    data = word.encode("utf-8")
    return encode_length(len(data)) + data


def encode_sentence(words: Sequence[str]) -> bytes:
    return b"".join(encode_word(w) for w in words) + b"\x00"


@dataclass
class Budget:
    """Bytes a reply may still take; reading past it raises ReplyTooLong."""

    left: int

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ReplyTooLong(f"more than the limit of bytes in one reply (a word of {n} bytes)")


async def read_word(reader: asyncio.StreamReader, budget: Budget) -> bytes:
    """One word, read exactly however the bytes arrive (a prefix may span segments)."""
    first = await reader.readexactly(1)
    size = prefix_size(first[0])
    prefix = first + (await reader.readexactly(size - 1) if size > 1 else b"")
    n = decode_length(prefix)
    budget.take(size + n)  # checked before reading: a huge length is refused without waiting for it
    return await reader.readexactly(n) if n else b""


async def read_sentence(reader: asyncio.StreamReader, budget: Budget) -> list[str]:
    words = []
    while word := await read_word(reader, budget):
        words.append(word.decode("utf-8", "replace"))
    return words


# -- replies ---------------------------------------------------------------------------------

@dataclass
class Sentence:
    reply: str                      # !re, !done, !trap, !empty, !fatal
    attrs: Attrs = field(default_factory=dict)
    tag: str | None = None
    text: str = ""                  # the reason word of !fatal


def parse_sentence(words: list[str]) -> Sentence:
    if not words:
        raise ProtocolError("an empty sentence")
    reply, rest = words[0], words[1:]
    if reply == "!fatal":
        return Sentence(reply, text=rest[0] if rest else "")
    if reply not in ("!re", "!done", "!trap", "!empty"):
        raise ProtocolError(f"unknown reply word {reply[:40]!r}")
    out = Sentence(reply)
    for word in rest:
        if word.startswith(".tag="):
            out.tag = word[5:]
        elif word.startswith("=") and "=" in word[1:]:
            name, _, value = word[1:].partition("=")
            out.attrs[name] = value
        else:  # a word without `=name=` (RouterOS sends none in replies we use): keep it visible
            raise ProtocolError(f"unexpected word {word[:40]!r} in a {reply} sentence")
    return out


@dataclass
class Reply:
    rows: list[Attrs]               # one per !re
    done: Attrs                     # the attributes of !done (`ret` after an add)


def login_response(password: str, challenge_hex: str) -> str:
    """The `=response=` of the pre-6.43 challenge login: "00" + md5(0x00 + password + challenge)."""
    try:
        challenge = bytes.fromhex(challenge_hex)
    except ValueError:
        raise ProtocolError("the login challenge is not hex") from None
    digest = hashlib.md5(b"\x00" + password.encode("utf-8") + challenge, usedforsecurity=False).hexdigest()
    return "00" + digest


# -- one connection --------------------------------------------------------------------------

class Connection:
    """One API session. `call` runs one command at a time; any failure other than a trap closes the
    connection (its state is unknown then), so `usable` turns false and the owner opens a new one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_reply: int) -> None:
        self._reader, self._writer, self._max_reply = reader, writer, max_reply
        self._lock = asyncio.Lock()
        self._tag = 0
        self._broken = False
        self.calls = 0  # commands answered: 0 means the connection has not yet proved itself

    @classmethod
    async def open(cls, host: str, port: int, tls: ssl.SSLContext | None, max_reply: int,
                   server_hostname: str | None = None) -> Connection:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=server_hostname if tls is not None else None)
        return cls(reader, writer, max_reply)

    @property
    def usable(self) -> bool:
        return not self._broken and not self._writer.is_closing()

    def peer_certificate(self) -> bytes | None:
        """The DER certificate the TLS peer presented (None over plain TCP)."""
        obj = self._writer.get_extra_info("ssl_object")
        return obj.getpeercert(binary_form=True) if obj is not None else None

    async def login(self, username: str, password: str) -> None:
        """Log in the 6.43+ way; a router that answers with a challenge gets the pre-6.43 response."""
        reply = await self.call(["/login", f"=name={username}", f"=password={password}"])
        if "ret" in reply.done:
            await self.call(["/login", f"=name={username}", f"=response={login_response(password, reply.done['ret'])}"])

    async def call(self, words: Sequence[str]) -> Reply:
        """Send one command and read its whole reply. Raises Trap (the connection stays usable), Fatal,
        ProtocolError, ReplyTooLong or a stream error (the connection is closed then)."""
        async with self._lock:
            if not self.usable:
                raise ConnectionResetError("the API connection is closed")
            self._tag += 1
            tag = str(self._tag)
            try:
                self._writer.write(encode_sentence([*words, f".tag={tag}"]))
                await self._writer.drain()
                reply = await self._read_reply(tag)
            except Trap:
                raise
            except BaseException:  # includes cancellation: a half-read reply leaves the stream unusable
                self.close()
                raise
            self.calls += 1
            return reply

    async def _read_reply(self, tag: str) -> Reply:
        budget = Budget(self._max_reply)
        rows: list[Attrs] = []
        trap: Trap | None = None
        while True:
            try:
                words = await read_sentence(self._reader, budget)
            except asyncio.IncompleteReadError:
                if trap is None:
                    raise
                self._broken = True  # the router closed after refusing (a login, on some releases)
                raise trap from None
            sentence = parse_sentence(words)
            if sentence.reply == "!fatal":
                raise Fatal(sentence.text)
            if sentence.tag is not None and sentence.tag != tag:
                continue  # a reply to a command given up earlier cannot reach us (we close then); be safe
            if sentence.reply == "!re":
                rows.append(sentence.attrs)
            elif sentence.reply == "!trap":
                trap = trap or Trap(sentence.attrs.get("message", "(no message)"), sentence.attrs.get("category"))
            elif sentence.reply == "!done":
                if trap is not None:
                    raise trap
                return Reply(rows, sentence.attrs)

    def close(self) -> None:
        self._broken = True
        if not self._writer.is_closing():
            self._writer.close()

    async def aclose(self) -> None:
        self.close()
        try:
            await self._writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
