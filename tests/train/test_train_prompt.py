"""The prompt layout and the tiny tokenizer (no store needed)."""


import pytest

from emollama.train.pieces import IGNORE, INSTRUCTIONS, Layout, Slot
from emollama.train.prompt import encode, instruction_for
from emollama.train.tiny import build_tokenizer, ensure_tiny_llm

LABELS = ["neutral", "angry", "happy", "sad", "worried", "surprise"]
PAPER = Layout(video=(Slot("g", 256),), feature=(Slot("l", 1), Slot("t", 1), Slot("a", 1), Slot("c", 1)))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tiny_tokenizer_is_deterministic_and_never_floods_unk(tok):
    again = build_tokenizer()
    assert tok.get_vocab() == again.get_vocab()
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    texts = [*LABELS, "[INST] <video></video> <feature></feature> [/INST]",
             "We can see lips stretched tight while hearing a trembling voice, which points to worried.",
             "Zebras quickly jumped over the naïve café: 5€!"]
    texts += [i.replace("{labels}", ", ".join(LABELS)) for pool in INSTRUCTIONS.values() for i in pool]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, t
        assert tok.decode(ids) == t
    # frequent words are single tokens, so prompts stay short
    assert len(tok(" worried", add_special_tokens=False)["input_ids"]) == 1


def test_encode_layout_loss_mask_and_prompt_prefix(tok):
    instr = instruction_for("emotion", "clip1", LABELS, fixed=True)
    full = encode(tok, PAPER, "I lost my job.", "emotion", instr, "sad")
    prompt = encode(tok, PAPER, "I lost my job.", "emotion", instr)
    # the training prompt is exactly the inference prompt
    assert full.ids[:len(prompt.ids)] == prompt.ids and full.answer_start == len(prompt.ids)
    assert sum(full.feat) == 260 and full.feat[: full.ids.index(tok.pad_token_id)].count(True) == 0
    answer = [l for l in full.labels if l != IGNORE]
    assert tok.decode(answer) == " sad</s>" and full.ids[-1] == tok.eos_token_id
    text = tok.decode([i for i, f in zip(full.ids, full.feat) if not f])
    assert text.startswith("<s>[INST] <video></video> <feature></feature> The person in the video says: I lost my job. [emotion]")
    assert "job.." not in text and text.endswith("[/INST] sad</s>")


def test_missing_views_and_subtitle_drop_their_parts(tok):
    audio_only = Layout(feature=(Slot("a", 1),))
    enc = encode(tok, audio_only, None, "reason", "Describe it.", "A low voice.")
    text = tok.decode([i for i, f in zip(enc.ids, enc.feat) if not f])
    assert "<video>" not in text and "says" not in text and sum(enc.feat) == 1
    assert text == "<s>[INST] <feature></feature> [reason] Describe it. [/INST] A low voice.</s>"


def test_instructions_vary_by_epoch_without_rng():
    got = {instruction_for("reason_v2", f"c{i}", LABELS, seed=1, epoch=e) for i in range(5) for e in range(4)}
    assert len(got) > 1
    assert instruction_for("emotion", "c", LABELS, seed=1, epoch=3) == instruction_for("emotion", "c", LABELS, seed=1, epoch=3)


def test_tiny_llm_folder_loads_with_transformers_alone(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_tiny_llm(tmp_path)
    assert folder == tmp_path / "models" / "tiny" / "llm" and ensure_tiny_llm(tmp_path) == folder
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size


def test_a_missing_language_model_fails_at_once_with_what_and_how(tmp_path, monkeypatch):
    from emollama.train.model import MissingModelError, load_llm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingModelError, match=r"meta-llama/Llama-2-7b-chat-hf.*offline.*(\n.*)local folder"):
        load_llm("meta-llama/Llama-2-7b-chat-hf")
    empty = tmp_path / "llm"
    empty.mkdir()
    with pytest.raises(MissingModelError, match="must hold config.json"):
        load_llm(str(empty))


def llama2_style_tokenizer(words):
    """A sentencepiece-like tokenizer built here: Metaspace (a word boundary '▁' before every piece, and a
    leading one at the start of every separately tokenized text, as LLaMA-2's), one token per piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def test_emotion_llama_prompt_token_for_token():
    from emollama.train.prompt import RELEASED_REASON_INSTRUCTIONS, caption_filter

    instr = RELEASED_REASON_INSTRUCTIONS[1]   # "What is the emotional state of the person in the video? ..."
    caption = 'She SMILES (broadly): "we won!"  Her voice rises;\nso -- happy~'
    assert caption_filter(caption) == "she smiles broadly we won her voice rises so -- happy"
    assert caption_filter(" ".join(["w"] * 250)) == " ".join(["w"] * 200)
    # written out by hand: every piece, the word boundaries and the two lone boundaries of the double spaces
    pieces = (["<s>", "▁[INST]", "▁<video>"] + ["PAD"] * 2 + ["▁</video>", "▁<feature>"] + ["PAD"] * 4
              + ["▁</feature>", "▁The", "▁person", "▁in", "▁video", "▁says:", "▁Well,", "▁I", "▁can't", "▁believe",
                 "▁it!.", "▁", "▁[reason]", "▁What", "▁is", "▁the", "▁emotional", "▁state", "▁of", "▁the",
                 "▁person", "▁in", "▁the", "▁video?", "▁Please", "▁tell", "▁me", "▁the", "▁reason.", "▁", "▁[/INST]"]
              + ["▁she", "▁smiles", "▁broadly", "▁we", "▁won", "▁her", "▁voice", "▁rises", "▁so", "▁--", "▁happy", "</s>"])
    tok = llama2_style_tokenizer([p for p in pieces if p != "PAD"])
    layout = Layout(video=(Slot("g", 2),), feature=(Slot("l", 1), Slot("t", 1), Slot("a", 1), Slot("c", 1)))
    enc = encode(tok, layout, "Well, I can't believe it!", "reason", instr, caption, style="emotion-llama")
    assert [p if not f else "PAD" for p, f in zip(tok.convert_ids_to_tokens(enc.ids), enc.feat)] == pieces
    assert sum(enc.feat) == 6
    n_answer = 12   # the filtered caption's 11 words and </s>
    assert enc.labels[:-n_answer] == [IGNORE] * (len(pieces) - n_answer)
    assert enc.labels[-n_answer:] == enc.ids[-n_answer:] and enc.answer_start == len(pieces) - n_answer
    # the prompt alone is the training prompt up to the answer (what inference feeds)
    prompt = encode(tok, layout, "Well, I can't believe it!", "reason", instr, None, style="emotion-llama")
    assert prompt.ids == enc.ids[:enc.answer_start]
    # the emotion task draws the released nine-label instruction whatever the label set
    assert instruction_for("emotion", "c", ["sad", "happy"], style="emotion-llama", seed=3, epoch=5) == (
        "Please determine which emotion label in the video represents: happy, sad, neutral, angry, worried, "
        "surprise, fear, contempt, doubt.")


def test_public_scorer_takes_the_last_word_and_defaults_to_neutral():
    from emollama.train.scoring import public_label

    labels = ["neutral", "angry", "happy", "sad", "worried", "surprise"]
    answers = {
        "happy": "happy",                                              # a bare label
        "  The emotion is sad ": "sad",                                 # stripped, then the last word
        "sad and then happy": "happy",                                  # the last word wins
        "happy.": "neutral",                                            # punctuation is not removed
        "Happy": "neutral",                                             # nor case
        "fear": "neutral",                                              # outside the six labels
        "I think she is angry but": "neutral",                          # the last word only
        "surprise\nsurprise": "neutral",                                # split on spaces, not newlines
        "": "neutral",
    }
    assert {a: public_label(a, labels) for a in answers} == answers
    assert public_label("joy", ["happy", "sad"]) is None   # no neutral to fall back on: counted, not mapped


def test_styles_and_evaluation_layouts():
    from emollama.train.prompt import PROMPT_STYLES, check_style

    assert PROMPT_STYLES == ("emollama", "emotion-llama", "chat")
    for style in PROMPT_STYLES:
        check_style(style)
    check_style("emotion-llama", "public-eval")
    with pytest.raises(ValueError, match="exists only for the emotion-llama prompt style"):
        check_style("chat", "public-eval")
    with pytest.raises(ValueError, match="choose emollama, emotion-llama, chat"):
        check_style("llama3")


@pytest.fixture(scope="module")
def sp_toks(tmp_path_factory):
    """{(kind, legacy): tokenizer}: Llama-2-style sentencepiece tokenizers, slow and fast, legacy on and off."""
    from train_helpers import sentencepiece_tokenizers

    root = tmp_path_factory.mktemp("sp")
    return {(kind, legacy): tok for legacy in (True, False)
            for kind, tok in sentencepiece_tokenizers(root / f"legacy-{legacy}", legacy).items()}


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("kind", ["slow", "fast"])
def test_public_eval_layout_makes_the_public_scripts_calls(sp_toks, kind, legacy):
    """The public script (get_context_emb) splits `<s>[INST] <video><ImageHere></video> ...` at the
    placeholder and calls tokenizer(seg, add_special_tokens=i == 0): two BOS, then a `[` whose word boundary
    is the tokenizer's legacy setting. The layout is compared with those very calls."""
    from emollama.train.prompt import RELEASED_EMOTION_INSTRUCTION

    tok = sp_toks[(kind, legacy)]
    sub = "I can't believe it!"
    enc = encode(tok, PAPER, sub, "emotion", RELEASED_EMOTION_INSTRUCTION, style="emotion-llama",
                 eval_layout="public-eval")
    segs = ["<s>[INST] <video>", f"</video> <feature><FeatureHere></feature> The person in video says: {sub}.  "
            f"[emotion] {RELEASED_EMOTION_INSTRUCTION}  [/INST]"]
    first, rest = (tok(s, add_special_tokens=i == 0)["input_ids"] for i, s in enumerate(segs))
    assert enc.ids == first + [tok.unk_token_id] * 260 + rest     # no pad token: slots hold unk's id
    assert enc.feat == [False] * len(first) + [True] * 260 + [False] * len(rest)
    assert enc.ids[:2] == [tok.bos_token_id] * 2
    assert tok.convert_ids_to_tokens(enc.ids[2]) == ("▁[" if legacy else "[")
    # the training layout is unchanged: one BOS, every piece without special tokens
    trained = encode(tok, PAPER, sub, "emotion", RELEASED_EMOTION_INSTRUCTION, style="emotion-llama")
    head = [tok.bos_token_id] + tok("[INST] <video>", add_special_tokens=False)["input_ids"]
    assert trained.ids[:len(head)] == head and trained.ids.count(tok.bos_token_id) == 1


def test_a_new_prompt_style_is_one_class_and_one_registration():
    """A PromptStyle subclass given to register_style is a style everywhere (config check, encode,
    instructions, stops); nothing outside the registry names styles."""
    import re
    from pathlib import Path

    from emollama.train import prompt as P
    from emollama.train.config import TrainConfig

    class Shouting(P.EmollamaStyle):
        name = "shouting"
        instructions = {t: tuple(i.upper() for i in pool) for t, pool in INSTRUCTIONS.items()}

    P.register_style(Shouting())
    try:
        assert P.instructions("emotion", ["happy"], "shouting")[0].startswith("WHICH EMOTION")
        P.check_style("shouting")
        cfg = TrainConfig()
        cfg.data.prompt = "shouting"
        assert not [p for p in cfg.problems() if "data.prompt" in p]
    finally:
        del P.STYLES["shouting"]
    with pytest.raises(ValueError, match="name of its own"):
        P.register_style(P.EmollamaStyle())
    repo = Path(__file__).resolve().parents[2]
    named = [f"{f.relative_to(repo)}:{n}" for d in ("train", "pipeline", "extract", "store", "corpora")
             for f in (repo / d).rglob("*.py") for n, line in enumerate(f.read_text().splitlines(), 1)
             if re.search(r'(style|prompt)\s*[!=]=\s*"', line)]
    assert named == []
