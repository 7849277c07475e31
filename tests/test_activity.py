"""The recent history behind GET /v1/status: one worker's buckets, and the host's sum of its workers."""

from __future__ import annotations

from llmserve.models.activity import BUCKET_SECONDS, BUCKETS, MAX_TTFTS, Activity, host_activity, ttft_view


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


START = 1_000_000 * BUCKET_SECONDS  # the start of a bucket


def test_a_bucket_holds_the_tokens_generated_in_it_and_its_longest_queue() -> None:
    clock = Clock(START)
    activity = Activity(clock)
    activity.sample("m", generated_tokens=100, queued=0)
    assert activity.view("m") is None  # nothing closed yet
    for second, (tokens, queued) in enumerate([(120, 3), (150, 1), (170, 0)], start=1):
        clock.now = START + second
        activity.sample("m", tokens, queued)
    clock.now = START + BUCKET_SECONDS  # the next bucket begins: the first closes
    activity.sample("m", 200, 2)
    assert activity.view("m") == {"last": START // BUCKET_SECONDS, "tokens": [100], "queued": [3]}


def test_tokens_made_while_the_hub_missed_buckets_are_spread_over_them_and_the_window_is_bounded() -> None:
    clock = Clock(START)
    activity = Activity(clock)
    activity.sample("m", 0, 4)
    clock.now = START + 3 * BUCKET_SECONDS
    activity.sample("m", 31, 1)
    view = activity.view("m")
    assert view is not None and view["tokens"] == [10, 10, 11] and view["queued"] == [4, 1, 1]
    for bucket in range(4, 4 + 2 * BUCKETS):
        clock.now = START + bucket * BUCKET_SECONDS
        activity.sample("m", 30 + bucket, 0)
    view = activity.view("m")
    assert view is not None and len(view["tokens"]) == BUCKETS and set(view["tokens"]) == {1}


def test_a_model_loaded_again_starts_a_new_history() -> None:
    clock = Clock(START)
    activity = Activity(clock)
    activity.sample("m", 500, 0)
    clock.now += BUCKET_SECONDS
    activity.sample("m", 600, 0)
    clock.now += BUCKET_SECONDS
    activity.sample("m", 10, 0)  # the counter went back: a new engine
    assert activity.view("m") is None


def test_the_window_waits_for_the_workers_to_close_the_newest_bucket() -> None:
    last = START // BUCKET_SECONDS
    just_after_a_boundary = (last + 2) * BUCKET_SECONDS + 0.2  # bucket last + 1 ended; nobody closed it yet
    host = host_activity([({"last": last, "tokens": [7], "queued": [0]}, [])], just_after_a_boundary)
    assert host.tokens[-1] == 7 and host.first + BUCKETS - 1 == last


def test_the_host_sums_workers_whose_buckets_line_up_on_the_clock() -> None:
    last = START // BUCKET_SECONDS
    now = (last + 1) * BUCKET_SECONDS + 1
    one = {"last": last, "tokens": [10, 20], "queued": [1, 0]}
    other = {"last": last - 1, "tokens": [5], "queued": [4]}  # a worker that has not written since
    host = host_activity([(one, [0.5, 0.1]), (other, [0.3]), (None, [])], now)
    assert len(host.tokens) == BUCKETS and host.first + BUCKETS - 1 == last
    assert host.tokens[-2:] == [15, 20] and host.queued[-2:] == [5, 0]
    assert host.tokens_per_second == 35 / 60  # the last minute's buckets
    assert host.ttft_percentile(0.5) == 0.3 and host.ttft_percentile(0.99) == 0.5


def test_buckets_older_than_the_window_are_left_out() -> None:
    last = START // BUCKET_SECONDS
    stale = {"last": last - BUCKETS - 5, "tokens": [99], "queued": [9]}
    host = host_activity([(stale, [])], (last + 1) * BUCKET_SECONDS)
    assert sum(host.tokens) == 0 and host.ttft_percentile(0.5) is None and host.tokens_per_second == 0


def test_a_status_file_keeps_the_newest_times_to_first_token() -> None:
    kept = ttft_view(float(n) for n in range(MAX_TTFTS + 10))
    assert len(kept) == MAX_TTFTS and kept[0] == 10.0
