"""Any chat LM: the `chat` prompt style (the tokenizer's own chat template) with tiny random Qwen2-style
and Mistral-style models built here, each with its family's chat template."""

import json

import pytest

from emollama.train.chat_prompt import ChatTemplateError
from emollama.train.pieces import IGNORE, Layout, Slot
from emollama.train.prompt import encode, instruction_for, stop_token_ids
from emollama.train.tiny import CHAT_FAMILIES, build_tokenizer, ensure_tiny_chat_llm

LABELS = ["neutral", "angry", "happy", "sad", "worried", "surprise"]
LAYOUT = Layout(video=(Slot("g", 3),), feature=(Slot("l", 1), Slot("a", 1), Slot("c", 1)))
SUB = "I lost my job."
# what each template writes around the user content, and what closes the assistant's turn
HEAD = {"qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "mistral": "<s>[INST] "}
HEADER = {"qwen2": "<|im_end|>\n<|im_start|>assistant\n", "mistral": "[/INST]"}
EOT = {"qwen2": "<|im_end|>", "mistral": "</s>"}
SEP = {"qwen2": "", "mistral": " "}                 # between the assistant header and the answer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    home = tmp_path_factory.mktemp("chat-home")
    return {f: ensure_tiny_chat_llm(home, f) for f in CHAT_FAMILIES}


@pytest.fixture(scope="module")
def toks(folders):
    from transformers import AutoTokenizer

    out = {}
    for family, folder in folders.items():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if tok.pad_token_id is None:          # as load_llm does (Mistral has no pad token)
            tok.pad_token = tok.unk_token or tok.eos_token
        out[family] = tok
    return out


def chat(tok, answer, layout=LAYOUT, subtitle=SUB, task="emotion", **kw):
    instr = instruction_for(task, "c1", LABELS, fixed=True, style="chat")
    return encode(tok, layout, subtitle, task, instr, answer, style="chat", **kw), instr


def text_pieces(tok, enc):
    """The decoded text runs between slots, and the slot run lengths, in order."""
    pieces, runs, cur, i = [], [], [], 0
    while i < len(enc.ids):
        if enc.feat[i]:
            pieces.append(tok.decode(cur))
            cur, n = [], 0
            while i < len(enc.ids) and enc.feat[i]:
                n, i = n + 1, i + 1
            runs.append(n)
        else:
            cur.append(enc.ids[i])
            i += 1
    return pieces + [tok.decode(cur)], runs


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_loss_only_on_the_answer_and_the_end_of_turn_token(toks, family):
    tok = toks[family]
    enc, instr = chat(tok, "sad")
    prompt, _ = chat(tok, None)
    # the training tokens start with exactly the inference prompt's
    assert enc.ids[:len(prompt.ids)] == prompt.ids and enc.answer_start == len(prompt.ids)
    assert prompt.labels == [IGNORE] * len(prompt.ids)
    # labels: IGNORE over the whole prompt (template headers included), the ids themselves after it
    assert enc.labels[:enc.answer_start] == [IGNORE] * enc.answer_start
    assert enc.labels[enc.answer_start:] == enc.ids[enc.answer_start:]
    assert tok.decode(enc.ids[enc.answer_start:]) == f"sad{EOT[family]}"   # (a leading ▁ decodes to nothing)
    assert tok.convert_ids_to_tokens(enc.ids[-1]) == EOT[family]     # nothing after the end of the turn
    assert tok.decode(enc.ids[:enc.answer_start]).endswith(HEADER[family])
    assert not any(enc.feat[enc.answer_start:])
    # a long answer is never cut (an example over data.max_len is rejected whole: TrainData), and the
    # end-of-turn token closes it
    long = " ".join(["The voice is low and slow."] * 40)
    whole, _ = chat(tok, long, task="reason")
    assert tok.decode(whole.ids[whole.answer_start:]).strip() == f"{long}{EOT[family]}"
    assert whole.labels[whole.answer_start:] == whole.ids[whole.answer_start:] and whole.answer_start > 0


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_slots_sit_in_the_user_message_where_the_template_puts_it(toks, family):
    tok = toks[family]
    enc, instr = chat(tok, "sad")
    pieces, runs = text_pieces(tok, enc)
    assert runs == [3, 3] and sum(enc.feat) == LAYOUT.n_tokens
    assert pieces[0] == HEAD[family] + "<video>"
    assert pieces[1] == "</video> <feature>"
    tail = f"</feature> The person in the video says: {SUB} [emotion] {instr}{HEADER[family]}"
    assert pieces[2] == f"{tail}{SEP[family]}sad{EOT[family]}"
    # an audio-only run without a subtitle drops the <video> section and the sentence, as the emollama style
    audio = Layout(feature=(Slot("a", 1),))
    enc, instr = chat(tok, None, layout=audio, subtitle=None, task="reason")
    pieces, runs = text_pieces(tok, enc)
    assert runs == [1] and pieces[0] == HEAD[family] + "<feature>"
    assert pieces[1] == f"</feature> [reason] {instr}{HEADER[family]}"


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_generation_prompt_ends_with_the_assistant_header_and_stops_at_the_end_of_turn(toks, family):
    tok = toks[family]
    prompt, _ = chat(tok, None)
    assert tok.decode(prompt.ids).endswith(HEADER[family])
    assert stop_token_ids(tok, "chat") == [tok.convert_tokens_to_ids(EOT[family])]
    assert stop_token_ids(tok, "emollama") == [tok.eos_token_id]


def test_end_of_turn_need_not_be_eos(toks):
    """A base Qwen tokenizer's EOS is <|endoftext|>: loss and stopping still end at <|im_end|>."""
    import copy

    tok = copy.deepcopy(toks["qwen2"])
    tok.eos_token = "<|endoftext|>"
    enc, _ = chat(tok, "sad")
    assert tok.decode(enc.ids[enc.answer_start:]) == "sad<|im_end|>"
    assert stop_token_ids(tok, "chat") == [tok.convert_tokens_to_ids("<|endoftext|>"),
                                            tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_a_system_prompt_goes_where_the_template_puts_it(toks, family):
    tok = toks[family]
    system = "You are an expert in reading emotions."
    enc, _ = chat(tok, "sad", system=system)
    prompt, _ = chat(tok, None, system=system)
    assert enc.ids[:len(prompt.ids)] == prompt.ids
    head = tok.decode(prompt.ids[:prompt.feat.index(True)])
    # Qwen: its own system turn instead of the default; Mistral v0.3: before the (last) user message
    assert head == {"qwen2": f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<video>",
                    "mistral": f"<s>[INST] {system}\n\n<video>"}[family]
    assert tok.decode(enc.ids[enc.answer_start:]).strip() == f"sad{EOT[family]}"


def test_a_token_that_would_merge_across_the_prompts_end_never_changes_the_prompt(toks):
    """A generation prompt that stops inside a word ("assis|tant"): the prompt stays the inference prompt
    token for token, and the rest of the turn (what the model must write) carries the loss."""
    import copy

    tok = copy.deepcopy(toks["qwen2"])
    tok.chat_template = tok.chat_template.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assis' }}")
    prompt, _ = chat(tok, None)
    assert tok.decode(prompt.ids).endswith("<|im_start|>assis")
    enc, _ = chat(tok, "sad")
    assert enc.ids[:len(prompt.ids)] == prompt.ids and enc.answer_start == len(prompt.ids)
    assert tok.decode(enc.ids[enc.answer_start:]) == "tant\nsad<|im_end|>"
    assert enc.labels[enc.answer_start:] == enc.ids[enc.answer_start:]


def test_a_template_that_writes_todays_date_gets_a_fixed_one(toks):
    """Llama-3.2's template writes strftime_now("%d %b %Y") unless date_string is given."""
    import copy

    from emollama.train.chat_prompt import CHAT_DATE

    tok = copy.deepcopy(toks["qwen2"])
    tok.chat_template = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
                         "{%- endif %}<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
                         + tok.chat_template.replace("{% if loop.first and messages[0]['role'] != 'system' %}",
                                                     "{% if false %}"))
    prompt, _ = chat(tok, None)
    assert tok.decode(prompt.ids).startswith(f"<|im_start|>system\nToday Date: {CHAT_DATE}<|im_end|>")


def test_a_tokenizer_without_a_chat_template_is_refused_with_the_fix():
    with pytest.raises(ChatTemplateError, match=r"has none: choose data.prompt = \"emollama\""):
        chat(build_tokenizer(), "sad")
    with pytest.raises(ValueError, match="only by the chat prompt style"):
        encode(build_tokenizer(), LAYOUT, SUB, "emotion", "Which?", "sad", system="Be brief.")


def test_config_accepts_the_chat_style_and_refuses_a_system_prompt_elsewhere(tmp_path):
    from emollama.train.config import TrainConfigError, load_train_config

    base = {"data": {"root": str(tmp_path), "store": "s.zarr", "prompt": "chat", "system": "Be brief."},
            "run": {"out": str(tmp_path / "run")}}
    assert load_train_config(None, base).data.system == "Be brief."
    base["data"]["prompt"] = "emollama"
    with pytest.raises(TrainConfigError, match=r"data.system is written only by the chat prompt style"):
        load_train_config(None, base)
    base["data"].update(prompt="llama3", system="")
    with pytest.raises(TrainConfigError, match=r"choose emollama, emotion-llama, chat"):
        load_train_config(None, base)


@pytest.mark.slow
@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_training_a_chat_lm_lowers_the_loss_and_records_style_and_lm(small_store, make_cfg, folders, family,
                                                                     tmp_path):
    from emollama.train.loop import train

    data, store = small_store
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = make_cfg(data, store, tmp_path / "run",
                   data={"prompt": "chat", "features": ["global.eva.tokens", "audio.hubert.mean"],
                         "tasks": ["emotion"]},
                   model={"llm": str(folders[family])}, lora={"target_modules": targets},
                   optim={"steps": 12, "batch_size": 4})
    result = train(cfg)
    loss = [h["loss"] for h in result.history]
    assert len(loss) == 12
    q = len(loss) // 4
    assert sum(loss[-q:]) / q < sum(loss[:q]) / q, loss
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["prompt"] == "chat" and saved["model"]["llm"] == str(folders[family])
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(targets)
    arch = json.loads((folders[family] / "config.json").read_text())["architectures"]
    assert arch == [{"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[family]]

    # the run loads back and generates from the chat template's generation prompt, stopping at its end of turn
    from emollama.corpora import load_corpus
    from emollama.store import FeatureStore
    from emollama.train.data import FeatureBatcher
    from emollama.train.generate import generate
    from emollama.train.run import load_run

    loaded = load_run(run, device="cpu")
    metrics = json.loads((run / "metrics.json").read_text())
    assert loaded.tiny and "tiny profile" in metrics["note"]   # a random fixture: flagged as one
    prompts = loaded.prompt_encoder()
    assert prompts.style == "chat" and prompts.stop_ids == [loaded.tokenizer.convert_tokens_to_ids(EOT[family])]
    clips = load_corpus("merr", data).split("test")[:2]
    batcher = FeatureBatcher.from_store(FeatureStore.open(store), loaded.feature_keys, [c.id for c in clips])
    answers = generate(loaded.model, prompts, batcher, clips, "emotion", max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_fixtures_are_deterministic_and_load_with_transformers_alone(folders, toks, family):
    from transformers import AutoModelForCausalLM

    from emollama.train.tiny import build_chat_tokenizer

    assert build_chat_tokenizer(family).get_vocab() == toks[family].get_vocab()
    assert toks[family].chat_template and ensure_tiny_chat_llm(folders[family].parents[2], family) == folders[family]
    model = AutoModelForCausalLM.from_pretrained(folders[family], local_files_only=True)
    assert model.config.model_type == family and model.config.vocab_size == len(toks[family])
    assert model.config.num_key_value_heads == 2 and model.config.hidden_size == 64
    text = "Zebras quickly jumped over the naïve café: 5€!"
    ids = toks[family](text, add_special_tokens=False)["input_ids"]
    assert toks[family].unk_token_id not in ids and toks[family].decode(ids) == text


def test_a_run_on_a_chat_fixture_counts_as_tiny_and_a_real_lm_folder_does_not(folders, tmp_path):
    from types import SimpleNamespace as NS

    from emollama.train.tiny import is_tiny_fixture

    assert is_tiny_fixture(NS(profile="tiny", llm=None)) and not is_tiny_fixture(NS(profile="paper", llm=None))
    assert is_tiny_fixture(NS(profile="paper", llm=str(folders["qwen2"])))   # the marker, whatever the profile
    real = tmp_path / "some-lm"
    real.mkdir()
    (real / "config.json").write_text("{}")
    assert not is_tiny_fixture(NS(profile="tiny", llm=str(real)))
    assert not is_tiny_fixture(NS(profile="tiny", llm="meta-llama/Llama-2-7b-chat-hf"))
