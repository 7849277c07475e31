"""Which free slot a new prompt is decoded in."""

from __future__ import annotations

from llmserve.engine.jobs import GenerationSpec
from llmserve.engine.slots import Slot, slot_for


def slot(index: int, cached: list[int], admitted: int) -> Slot:
    return Slot(index, cached=cached, admitted=admitted)


def test_the_slot_with_the_longest_worthwhile_prefix_is_reused() -> None:
    free = [slot(0, [1] * 10, 5), slot(1, list(range(100)), 9), slot(2, [], 0)]
    assert slot_for(free, free, [*range(80), 7, 7], worth_reusing=64).index == 1


def test_a_short_shared_opening_does_not_evict_a_cached_prompt() -> None:
    other_session = [1, 2, 3] + [9] * 200
    free = [slot(0, other_session, 4), slot(1, [], 0), slot(2, [5] * 50, 2)]
    assert slot_for(free, free, [1, 2, 3] + [8] * 200, worth_reusing=64).index == 1  # the empty one


def test_without_an_empty_slot_the_least_recently_used_is_evicted() -> None:
    free = [slot(0, [1] * 100, 7), slot(1, [2] * 100, 3), slot(2, [3] * 100, 5)]
    assert slot_for(free, free, [4] * 100, worth_reusing=64).index == 1


def test_a_short_prompt_reuses_half_of_itself() -> None:
    free = [slot(0, [], 0), slot(1, [1, 2, 3, 4, 5, 6], 3)]
    assert slot_for(free, free, [1, 2, 3, 4, 9, 9], worth_reusing=64).index == 1
    assert slot_for(free, free, [1, 2, 9, 9, 9, 9, 9], worth_reusing=64).index == 0


def test_a_spare_copy_of_a_busy_sessions_prompt_is_evicted_before_another_session() -> None:
    session_a, session_b = [1] * 100, [2] * 100
    busy = Slot(0, cached=session_a[:40], admitted=9)
    busy.spec = GenerationSpec(prompt=(*session_a, 5), max_tokens=4)
    copy_of_a, only_b = slot(1, [*session_a, 6], 6), slot(2, session_b, 3)
    free = [copy_of_a, only_b]
    assert slot_for([busy, *free], free, [3] * 100, worth_reusing=64) is copy_of_a
