"""Which idle sequence the batched llama.cpp engine gives a request: the sequences in use stay together.

llama.cpp decodes a batch over every sequence between the lowest and the highest id in it (each
sequence's cache is kept apart), so four tokens in sequences 0, 2, 4 and 6 cost nearly twice four in
0 to 3 on gemma-3-270m. The choice is checked here without a model: the scheduler's idle book and a
stand-in for the one llama.cpp call that empties a sequence.
"""

from __future__ import annotations

from node.runtimes.llama_batch import BatchScheduler


class EmptiedSequences:
    """Stands in for llama_cpp: records each sequence emptied."""

    def __init__(self) -> None:
        self.emptied: list[int] = []

    def llama_memory_seq_rm(self, _memory: object, seq: int, _from: int, _to: int) -> bool:
        self.emptied.append(seq)
        return True


def scheduler(sequences: int, idle: dict[int, list[int]]) -> tuple[BatchScheduler, EmptiedSequences]:
    """A scheduler of ``sequences`` with ``idle`` (least recently used first: what each still holds)."""
    lib = EmptiedSequences()
    batch = object.__new__(BatchScheduler)
    batch.__dict__.update(n_seq=sequences, _idle=dict(idle), _lib=lib, _mem=None)
    return batch, lib


def test_requests_arriving_one_by_one_fill_the_lowest_sequences_whatever_order_they_were_freed_in():
    # Freed in an earlier round in this order: the least recently used would be 5, 6, 7, 0.
    batch, lib = scheduler(8, {s: [] for s in (5, 6, 7, 0, 1, 2, 3, 4)})
    taken = [batch._take() for _ in range(4)]
    assert taken == [0, 1, 2, 3]
    assert lib.emptied == taken


def test_a_request_takes_the_empty_sequence_that_widens_the_range_in_use_least():
    batch, _ = scheduler(8, {s: [] for s in (0, 1, 2, 3, 6, 7)})  # 4 and 5 are in use
    # Each time the range grows by one, downwards on a tie; never 0 or 7 while a neighbour is free.
    assert [batch._take() for _ in range(6)] == [3, 2, 1, 0, 6, 7]


def test_a_sequence_holding_a_kept_prompt_is_taken_only_when_none_is_empty_least_recently_used_first():
    batch, lib = scheduler(4, {2: [1, 2, 3], 0: [], 3: [4, 5], 1: [6]})
    assert batch._take() == 0
    assert batch._take() == 2  # no empty one left: the least recently used gives up its prompt
    assert lib.emptied == [0, 2]
    assert list(batch._idle) == [3, 1]
