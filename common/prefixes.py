"""How a prompt prefix is named, the same way on nodes and balancers: chained 64-bit hashes.

The balancer has no tokenizer, so prefixes are named from the request itself. A chat prefix is the
first *k* messages: its hash chains the previous one with the message's role, name and content, so
equal hashes mean equal conversations up to there. A completion prefix is the prompt's first *k*
whole blocks of ``TEXT_BLOCK_CHARS`` characters, chained the same way. A node reports the hashes of
the prefixes it keeps computed (``PrefixReport``); the router looks up a request's hashes, longest
first, to find which node holds the most of it. Each hash comes with the characters it covers, so a
match can be weighed against the whole prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from common.inference import ChatMessage

TEXT_BLOCK_CHARS = 256  # a completion prefix grows in blocks this long; a shorter tail is not named
MAX_REPORTED = 4096  # hashes a node reports per model, at most; the rest are its least recently used
_CHAT_SEED = b"llmlb/chat/1"
_TEXT_SEED = b"llmlb/text/1"


@dataclass(frozen=True, slots=True)
class Prefix:
    """One named prefix of a prompt: its chained hash and how many characters of the prompt it covers."""

    hash: int  # unsigned 64-bit, as carried in PrefixReport.hashes
    chars: int


def _chain(previous: bytes, *parts: str) -> bytes:
    digest = hashlib.blake2b(previous, digest_size=8)
    for part in parts:
        encoded = part.encode("utf-8", errors="surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))  # lengths first: no two splits hash alike
        digest.update(encoded)
    return digest.digest()


def chat_prefixes(messages: Iterable[ChatMessage]) -> list[Prefix]:
    """One prefix per message: the conversation up to and including it."""
    out: list[Prefix] = []
    state, chars = _CHAT_SEED, 0
    for message in messages:
        state = _chain(state, message.role, message.name, message.content)
        chars += len(message.content) + len(message.role)
        out.append(Prefix(int.from_bytes(state, "little"), chars))
    return out


def text_prefixes(prompt: str) -> list[Prefix]:
    """One prefix per whole block of ``TEXT_BLOCK_CHARS`` characters of a completion prompt."""
    out: list[Prefix] = []
    state = _TEXT_SEED
    for end in range(TEXT_BLOCK_CHARS, len(prompt) + 1, TEXT_BLOCK_CHARS):
        state = _chain(state, prompt[end - TEXT_BLOCK_CHARS : end])
        out.append(Prefix(int.from_bytes(state, "little"), end))
    return out


def longest_held(prefixes: Sequence[Prefix], held: Callable[[int], bool]) -> int:
    """Characters covered by the longest of ``prefixes`` that ``held`` says is kept; 0 if none is."""
    for prefix in reversed(prefixes):
        if held(prefix.hash):
            return prefix.chars
    return 0
