"""The wait helper every test uses: it returns as soon as the condition holds and fails clearly when not."""

from __future__ import annotations

import itertools

import pytest

from tests.fixtures.eventually import consistently, eventually, eventually_async


def test_eventually_returns_the_first_truthy_answer() -> None:
    answers = iter([None, 0, "", "there"])
    assert eventually(lambda: next(answers), 5, "an answer", every=0) == "there"


def test_eventually_fails_naming_what_it_waited_for_and_what_it_last_saw() -> None:
    counter = itertools.count()
    with pytest.raises(AssertionError) as failed:
        eventually(
            lambda: next(counter) < 0, 0.05, "a negative count", every=0.01, describe=lambda: "log tail"
        )
    message = str(failed.value)
    assert message.startswith("not within 0.05 s: a negative count (last returned False)")
    assert message.endswith("\nlog tail")


def test_exceptions_count_as_not_yet_only_when_ignored() -> None:
    calls = itertools.count()

    def flaky() -> bool:
        if next(calls) < 3:
            raise ConnectionError("not up yet")
        return True

    assert eventually(flaky, 5, "up", every=0, ignoring=(ConnectionError,)) is True

    def down() -> bool:
        raise ConnectionError("down")

    with pytest.raises(AssertionError, match=r"last raised ConnectionError\('down'\)"):
        eventually(down, 0.05, "up", every=0.01, ignoring=(ConnectionError,))
    with pytest.raises(ConnectionError):  # not ignored: it fails at once, not after 5 s
        eventually(down, 5, "up")


async def test_eventually_async_awaits_coroutine_conditions_and_calls_plain_ones() -> None:
    polls = itertools.count()

    async def third_poll() -> int:
        return next(polls) >= 2 and 7

    assert await eventually_async(third_poll, 5, "the third poll", every=0) == 7
    assert await eventually_async(lambda: "plain", 5, "a plain answer") == "plain"
    with pytest.raises(AssertionError, match=r"not within 0\.05 s: never"):
        await eventually_async(lambda: False, 0.05, "never", every=0.01)


def test_consistently_fails_at_the_first_poll_that_does_not_hold() -> None:
    consistently(lambda: True, 0.05, "always", every=0.01)
    polls = itertools.count()
    with pytest.raises(AssertionError, match=r"no longer true after .* s: steady"):
        consistently(lambda: next(polls) < 2, 5, "steady", every=0.01)
