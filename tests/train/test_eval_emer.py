"""EMER scoring against a chat-completions judge served by the test on loopback."""

import pytest

from train_helpers import FakeJudge
from emollama.train.emer import Judge, JudgeConfig, JudgeError, lexical_proxy, parse_scores, score_emer


@pytest.fixture
def fake():
    servers = []

    def make(replies):
        servers.append(FakeJudge(replies))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


@pytest.mark.parametrize("reply, scores", [
    ('{"clue_overlap": 7, "label_overlap": 6}', (7.0, 6.0)),
    ('Sure! ```json\n{"clue_overlap": 8.5, "label_overlap": 10}\n```', (8.5, 10.0)),
    ("Clue overlap: 7/10. Label overlap - 5.", (7.0, 5.0)),
    ('{"clue_overlap": 11, "label_overlap": 6}', None),       # out of range
    ('{"clue_overlap": 0, "label_overlap": 6}', None),
    ("I think they are quite similar.", None),                 # malformed
    ('{"clue_overlap": "high", "label_overlap": 6}', None),
])
def test_parse_scores(reply, scores):
    assert parse_scores(reply) == scores


def test_judge_retries_bad_replies_caches_and_counts_invalid(fake, tmp_path):
    server = fake([
        '{"clue_overlap": 7, "label_overlap": 6}',              # clip a
        "no idea", '{"clue_overlap": 12, "label_overlap": 3}', "Clue overlap: 4, label overlap: 9",   # b
        "nope", "still nope", "nothing",                           # c: invalid after 3 tries
    ])
    cfg = JudgeConfig(base_url=server.url, model="judge-1", api_key="k", retries=2, cache=tmp_path / "cache.jsonl")
    judge = Judge(cfg)
    res = score_emer(["a", "b", "c"], ["she smiles", "he frowns", "x"], ["a smile: happy", "frown: angry", "y"], judge)
    assert res["method"] == "llm-judge:judge-1" and res["n"] == 2 and res["invalid"] == ["c"]
    assert res["clue_overlap"] == pytest.approx(5.5) and res["label_overlap"] == pytest.approx(7.5)
    assert server.seen[0][0] == "/v1/chat/completions" and server.seen[0][1] == "Bearer k"
    assert server.seen[0][2]["model"] == "judge-1" and server.seen[0][2]["messages"][0]["role"] == "system"
    assert len(server.seen) == 7

    # a rerun costs nothing for the valid ones (c is asked again: invalid judgements are not cached)
    server.replies = ['{"clue_overlap": 2, "label_overlap": 2}']
    again = score_emer(["a", "b", "c"], ["she smiles", "he frowns", "x"], ["a smile: happy", "frown: angry", "y"],
                       Judge(cfg))
    assert len(server.seen) == 8 and again["n"] == 3 and again["invalid"] == []
    assert [r["clue_overlap"] for r in again["rows"]] == [7.0, 4.0, 2.0]


def test_http_errors_are_clear(fake):
    server = fake(["HTTP500"])
    with pytest.raises(JudgeError, match="HTTP 500"):
        Judge(JudgeConfig(base_url=server.url, model="m")).score("a", "b")
    with pytest.raises(JudgeError, match="unreachable"):
        Judge(JudgeConfig(base_url="http://127.0.0.1:9", model="m", timeout=2)).score("a", "b")
    with pytest.raises(ValueError, match="no EMER judge configured"):
        Judge(JudgeConfig())


def test_lexical_proxy_is_named_and_bounded():
    res = score_emer(["a", "b"], ["The woman smiles broadly; she is happy.", "He shouts: angry."],
                     ["A woman smiles broadly and sounds happy.", "A calm man, neutral."])
    assert res["method"] == "lexical-proxy" and res["requests"] == 0
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["a"]["label_overlap"] == 10.0 and rows["b"]["label_overlap"] == 1.0
    assert 1.0 < rows["a"]["clue_overlap"] <= 10.0
    assert lexical_proxy("", "") == (1.0, 1.0)
