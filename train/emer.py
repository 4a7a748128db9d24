"""EMER scoring: Clue Overlap and Label Overlap (1-10) of predicted vs reference descriptions.

The scores come from an LLM judge behind any OpenAI-compatible chat-completions endpoint
(`JudgeConfig`: base URL, model and key from arguments or the environment: EMOLLAMA_JUDGE_URL,
EMOLLAMA_JUDGE_MODEL, EMOLLAMA_JUDGE_KEY, falling back to OPENAI_BASE_URL / OPENAI_API_KEY).
Every valid judgement is cached on disk by a hash of the model and the exact messages, so a rerun
costs nothing. Replies are parsed robustly (JSON, or "clue ... 7, label ... 6" prose); a reply that
is malformed or out of range is retried, then counted as invalid, never guessed.

With no judge configured, `lexical_proxy` gives offline scores from word overlap. They are named
"lexical-proxy" everywhere and are never mixed with judge scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from emollama.train.scoring import SYNONYMS

log = logging.getLogger(__name__)

SYSTEM = (
    "You grade emotion descriptions of video clips. You are given a reference description written by "
    "annotators and a predicted description written by a model. Give two integer scores from 1 to 10: "
    "clue_overlap, how many of the reference's emotional cues (facial expressions, voice, words, "
    "context) the prediction also reports, without contradicting them; label_overlap, how well the "
    "emotional states the prediction concludes match the reference's. Reply with JSON only, like "
    '{"clue_overlap": 6, "label_overlap": 8}.'
)


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered with an HTTP error."""


@dataclass
class JudgeConfig:
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 2                 # extra attempts after a malformed or out-of-range reply
    cache: Path | None = None        # a JSON-lines file of judgements

    @classmethod
    def from_env(cls, **overrides) -> "JudgeConfig":
        env = os.environ
        cfg = cls(base_url=env.get("EMOLLAMA_JUDGE_URL") or env.get("OPENAI_BASE_URL"),
                  model=env.get("EMOLLAMA_JUDGE_MODEL"),
                  api_key=env.get("EMOLLAMA_JUDGE_KEY") or env.get("OPENAI_API_KEY"))
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg

    @property
    def configured(self) -> bool:
        return bool(self.base_url and self.model)


def messages(prediction: str, reference: str) -> list[dict]:
    user = f"Reference description:\n{reference.strip()}\n\nPredicted description:\n{prediction.strip()}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_NUM = r"(-?\d+(?:\.\d+)?)"


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(clue, label) from a judge's reply, or None when it holds no valid pair of scores in 1..10."""
    found: dict[str, float] = {}
    m = re.search(r"\{.*?\}", reply, flags=re.S)
    if m:
        try:
            obj = json.loads(m.group(0))
            for key, name in (("clue", "clue_overlap"), ("label", "label_overlap")):
                val = next((v for k, v in obj.items() if name in k.lower().replace(" ", "_")), None)
                if isinstance(val, (int, float)) and not isinstance(val, bool):
                    found[key] = float(val)
        except (json.JSONDecodeError, AttributeError):
            pass
    for key in ("clue", "label"):
        if key not in found:
            m = re.search(rf"{key}[\s_-]*overlap\D{{0,20}}?{_NUM}", reply, flags=re.I)
            if m:
                found[key] = float(m.group(1))
    if set(found) != {"clue", "label"}:
        return None
    if not all(1.0 <= v <= 10.0 for v in found.values()):
        return None
    return found["clue"], found["label"]


@dataclass
class Judge:
    config: JudgeConfig
    requests: int = 0
    _cache: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.config.configured:
            raise ValueError("no EMER judge configured: set base_url and model (or EMOLLAMA_JUDGE_URL and "
                             "EMOLLAMA_JUDGE_MODEL), or score with the offline lexical proxy")
        if self.config.cache and self.config.cache.exists():
            for line in self.config.cache.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self._cache[rec["key"]] = rec

    @property
    def name(self) -> str:
        return f"llm-judge:{self.config.model}"

    def _post(self, msgs: list[dict]) -> str:
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": self.config.model, "messages": msgs, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        self.requests += 1
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=self.config.timeout) as r:
                data = json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            raise JudgeError(f"judge {url} answered HTTP {e.code}: {e.read()[:200]!r}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise JudgeError(f"judge {url} unreachable: {e}") from e
        except json.JSONDecodeError as e:
            raise JudgeError(f"judge {url} answered with something that is not JSON") from e
        try:
            return str(data["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {url}: no choices[0].message.content in the reply") from None

    def score(self, prediction: str, reference: str) -> dict:
        """{"clue": float|None, "label": float|None, "valid": bool, "reply": str, "cached": bool}."""
        msgs = messages(prediction, reference)
        key = hashlib.sha256(json.dumps([self.config.model, msgs], sort_keys=True).encode()).hexdigest()
        if key in self._cache:
            return {**self._cache[key], "cached": True}
        reply = ""
        for _ in range(1 + max(0, self.config.retries)):
            reply = self._post(msgs)
            scores = parse_scores(reply)
            if scores is not None:
                rec = {"key": key, "clue": scores[0], "label": scores[1], "valid": True, "reply": reply}
                self._cache[key] = rec
                if self.config.cache:
                    self.config.cache.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.config.cache, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                return {**rec, "cached": False}
            log.info("judge reply not usable (%r); asking again", reply[:120])
        return {"key": key, "clue": None, "label": None, "valid": False, "reply": reply, "cached": False}


_STOP = set("a an the and or but of to in on at for with by from is are was were be been being this that these "
            "those it its he she they his her their him them i you we as so very also which who whom into than "
            "then there here has have had do does did not no can could would should may might will just".split())
_EMOTION_WORDS = {w: lab for lab, words in SYNONYMS.items() for w in words if " " not in w}


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP and len(w) > 2]


def lexical_proxy(prediction: str, reference: str) -> tuple[float, float]:
    """Offline stand-in scores in 1..10: clue = 1 + 9 x word-overlap F1 of content words; label =
    1 + 9 x Jaccard overlap of the emotion labels the two texts name. A proxy, not the EMER metric."""
    p, r = _words(prediction), _words(reference)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    f1 = 2 * common / (len(p) + len(r)) if p and r else 0.0
    lp = {_EMOTION_WORDS[w] for w in p if w in _EMOTION_WORDS}
    lr = {_EMOTION_WORDS[w] for w in r if w in _EMOTION_WORDS}
    jac = len(lp & lr) / len(lp | lr) if lp | lr else 0.0
    return 1 + 9 * f1, 1 + 9 * jac


def score_emer(ids: Sequence[str], predictions: Sequence[str], references: Sequence[str],
               judge: Judge | None = None) -> dict:
    """Mean Clue / Label Overlap over the valid judgements; `method` names the judge or the proxy."""
    rows, clue, label, invalid = [], [], [], []
    for cid, pred, ref in zip(ids, predictions, references):
        if judge is not None:
            res = judge.score(pred, ref)
            c, lab, ok = res["clue"], res["label"], res["valid"]
        else:
            (c, lab), ok = lexical_proxy(pred, ref), True
        rows.append({"id": cid, "clue_overlap": c, "label_overlap": lab, "valid": ok})
        if ok:
            clue.append(c)
            label.append(lab)
        else:
            invalid.append(cid)
    n = len(clue)
    return {"method": judge.name if judge is not None else "lexical-proxy",
            "clue_overlap": sum(clue) / n if n else None, "label_overlap": sum(label) / n if n else None,
            "n": n, "invalid": invalid, "rows": rows,
            "requests": judge.requests if judge is not None else 0}
