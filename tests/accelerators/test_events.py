"""Notices: deduplicated by their once-key, with a bounded memory of keys (a server that runs for weeks and
raises new keys every prompt does not grow without end)."""


def test_once_keys_deduplicate_and_the_memory_of_them_is_bounded(pack):
    from comfy_accel.accelerators import events

    emitted = []
    listener = lambda event, data: emitted.append(data["message"]) if event == "accel.notice" else None  # noqa: E731
    events.add_listener(listener)
    try:
        assert events.notice("test", "first", level="info", once_key="test:first")
        assert not events.notice("test", "first again", level="info", once_key="test:first")
        for run in range(events.SEEN_LIMIT + 50):   # one new key per run, as a compile session's token gives
            events.notice("test", f"run {run}", level="info", once_key=f"test:run:{run}")
        assert len(events._seen) == events.SEEN_LIMIT
        last = f"test:run:{events.SEEN_LIMIT + 49}"
        assert not events.notice("test", "still known", level="info", once_key=last)
        assert events.notice("test", "first, forgotten", level="info", once_key="test:first")  # least recent
        for _ in range(3):   # without a once-key every notice is emitted and nothing is remembered
            events.notice("test", "plain", level="info")
    finally:
        events.remove_listener(listener)
    assert emitted.count("plain") == 3 and "first again" not in emitted and "still known" not in emitted
    assert len(events._seen) == events.SEEN_LIMIT
    assert len(events.recent(10_000)) == events.RECENT_LIMIT
