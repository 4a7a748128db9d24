"""Helpers for the stage-two tests (imported by name: tests/ has no packages)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def tiny_toml(path: Path, data: Path, store: Path, run: Path, *, steps: int, save_every: int = 2,
              warmup_steps: int = 2, batch_size: int = 4, log_every: int = 10) -> Path:
    """The same audio-only tiny run as `tiny_cfg(..., data={"features": ["audio.hubert.mean"]})`, as a
    TOML file for `emollama train -c` in a subprocess."""
    path.write_text(f"""
[data]
root = "{data}"
store = "{store}"
features = ["audio.hubert.mean"]
standardize = true
[model]
profile = "tiny"
[lora]
alpha = 64
[optim]
lr = 3e-3
min_lr = 1e-5
warmup_steps = {warmup_steps}
steps = {steps}
batch_size = {batch_size}
[run]
out = "{run}"
seed = 7
save_every = {save_every}
eval_every = 0
log_every = {log_every}
""")
    return path


class FakeJudge:
    """Answers POST /v1/chat/completions with scripted replies, in order."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.seen = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.path, self.headers.get("Authorization"), body))
                reply = outer.replies.pop(0)
                if reply == "HTTP500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"boom")
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def sentencepiece_tokenizers(folder: Path, legacy: bool) -> dict:
    """A Llama-2-style sentencepiece model trained here (BPE, byte fallback, a dummy prefix, `<unk> <s> </s>`
    = 0 1 2, no pad), as transformers 5 offers it, both with `legacy` and adding BOS:

    - "slow": `SentencePieceBackend` over the `.model` file, the Python tokenizer that runs sentencepiece
      itself (transformers 5 has no slow `LlamaTokenizer`: that name is now the tokenizers-backed one);
    - "fast": `LlamaTokenizer` (tokenizers), converted from the same file by `AutoTokenizer`."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from emollama.train.pieces import INSTRUCTIONS
    from emollama.train.prompt import RELEASED_INSTRUCTIONS
    from emollama.train.tiny import _corpus

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "tokenizer.model"
    if not model.exists():
        lines = _corpus() + [i for pool in (*INSTRUCTIONS.values(), *RELEASED_INSTRUCTIONS.values()) for i in pool]
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=800, model_type="bpe", byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity", add_dummy_prefix=True,
            remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0, minloglevel=2)
        model.write_bytes(buf.getvalue())
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True, **names}))
    slow = SentencePieceBackend(vocab_file=str(model), legacy=legacy, special_tokens_pattern="bos", **names)
    fast = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert type(fast).__name__ == "LlamaTokenizer" and fast.legacy == legacy
    return {"slow": slow, "fast": fast}
