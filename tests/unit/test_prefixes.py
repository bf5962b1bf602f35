"""Prefix names: equal conversations (or prompt blocks) hash alike on every side, different ones do not."""

from __future__ import annotations

from common.inference import ChatMessage
from common.prefixes import TEXT_BLOCK_CHARS, chat_prefixes, longest_held, text_prefixes

SYSTEM = ChatMessage("system", "You are terse.")
ASK = ChatMessage("user", "Name a colour.")


def test_a_longer_conversation_extends_the_shorter_ones_hashes() -> None:
    short = chat_prefixes([SYSTEM, ASK])
    longer = chat_prefixes([SYSTEM, ASK, ChatMessage("assistant", "Red."), ChatMessage("user", "Another.")])
    assert [p.hash for p in longer[:2]] == [p.hash for p in short]
    assert len({p.hash for p in longer}) == 4
    assert [p.chars for p in longer] == sorted(p.chars for p in longer)


def test_role_name_and_content_all_count_and_cannot_be_shifted_between_fields() -> None:
    base = chat_prefixes([ASK])[0].hash
    assert chat_prefixes([ChatMessage("system", ASK.content)])[0].hash != base
    assert chat_prefixes([ChatMessage("user", ASK.content, name="ann")])[0].hash != base
    shifted = ChatMessage("user", "b", "ac")
    assert chat_prefixes([ChatMessage("user", "ab", name="c")]) != chat_prefixes([shifted])


def test_completion_prompts_are_named_by_whole_blocks_only() -> None:
    prompt = "x" * (TEXT_BLOCK_CHARS * 2 + 10)
    named = text_prefixes(prompt)
    assert [p.chars for p in named] == [TEXT_BLOCK_CHARS, 2 * TEXT_BLOCK_CHARS]
    assert text_prefixes(prompt[: TEXT_BLOCK_CHARS - 1]) == []
    assert text_prefixes(prompt + "more")[:2] == named
    assert text_prefixes("y" + prompt[1:])[0].hash != named[0].hash


def test_chat_and_completion_hashes_never_collide_for_the_same_text() -> None:
    text = "z" * TEXT_BLOCK_CHARS
    assert chat_prefixes([ChatMessage("", text)])[0].hash != text_prefixes(text)[0].hash


def test_longest_held_finds_the_longest_kept_prefix() -> None:
    named = chat_prefixes([SYSTEM, ASK, ChatMessage("assistant", "Red.")])
    kept = {named[0].hash, named[1].hash}
    assert longest_held(named, kept.__contains__) == named[1].chars
    assert longest_held(named, set().__contains__) == 0
    assert all(0 <= p.hash < 2**64 for p in named)
