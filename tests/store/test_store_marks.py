"""The commit log's replay, on hand-written marks: typed events, ordering, and the live state they give."""

from __future__ import annotations

from emollama.store.marks import ClipCopy, ClipRecord, LiveState, Tombstone, mark_events, mark_problem

S1, S2, S3, S4 = (f"{i:020d}-0000000{i}" for i in range(1, 5))


def replay(marks: dict[str, dict]) -> LiveState:
    live = LiveState(active=sorted(marks))
    live.apply(sorted((e for s in live.active for e in mark_events(s, marks[s])), key=lambda e: (e.order, e.rank)))
    return live


def test_events_are_typed_and_carry_where_the_rows_are():
    mark = {"sets": {"fixed": {"clips": ["a", "b"]}, "var": {"clips": ["a", "b"], "offsets": [0, 3, 5],
                                                             "origin": [S1, S2]}},
            "removed": {"fixed": ["z"]}, "removed_at": {"var": {"y": S1}},
            "records": {"a": {"status": "ok"}}, "record_origin": {"a": S1}}
    assert mark_problem(mark, S3) is None
    ev = mark_events(S3, mark)
    assert ev[:4] == [ClipCopy(S3, "fixed", "a", S3, 0, None), ClipCopy(S3, "fixed", "b", S3, 1, None),
                      ClipCopy(S1, "var", "a", S3, 0, 3), ClipCopy(S2, "var", "b", S3, 3, 5)]
    assert ev[4:] == [Tombstone(S3, "fixed", "z", S3), Tombstone(S1, "var", "y", S3),
                      ClipRecord(S1, "a", {"status": "ok"}, S3)]
    assert ev[0].rows == (0, 1) and ev[0].n_rows == 1 and ev[3].rows == (3, 5) and ev[3].n_rows == 2


def test_replay_rules():
    marks = {
        S1: {"sets": {"k": {"clips": ["a", "b", "c"]}},
             "records": {"a": {"status": "ok", "src": "1"}, "b": {"status": "ok"}, "c": {"status": "ok"}}},
        # a later duplicate of a does not replace the first copy; a failure of d is recorded
        S2: {"sets": {"k": {"clips": ["a"]}}, "records": {"a": {"status": "ok", "extra": 2},
                                                          "d": {"status": "failed", "reason": "decode"}}},
        # b is replaced: the tombstone sorts just before this mark's own copy, so the new copy is live
        S3: {"sets": {"k": {"clips": ["b", "d"]}}, "removed_at": {"k": {"b": S3}}, "records": {"d": {"status": "ok"}}},
        # c is forgotten everywhere, record included
        S4: {"removed": {"*": ["c"]}},
    }
    live = replay(marks)
    assert {c: (cp.segment, cp.start) for c, cp in live.copies["k"].items()} == {"a": (S1, 0), "b": (S3, 0),
                                                                                  "d": (S3, 1)}
    assert live.records == {"a": {"status": "ok", "src": "1", "extra": 2}, "b": {"status": "ok"},
                            "d": {"status": "ok"}}  # a later success drops the failure's reason
    assert live.record_src["d"].segment == S3 and "c" not in live.record_src
    assert live.clips() == {"a", "b", "d"}
