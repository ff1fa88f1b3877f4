"""Tokenizers and encoding: text and segments to ids and labels.

Holds the tokenizers (ByteTokenizer, HFTokenizer, SentencePieceTokenizer), training and caching
desmoe's sentencepiece model (train_sentencepiece, spm_cache_dir), build_tokenizer for
``data.tokenizer``, the chat-template rendering of chat examples, and encode_example / eval_pair /
prompt_ids. transformers and sentencepiece are imported only where they are used.
"""

from __future__ import annotations

import os
from typing import Iterable

from desmoe.constants import IGNORE_INDEX
from desmoe.data.sources import ChatExample, DataError, Segment, example_text, load_domain_texts


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0 pad, 1 bos, 2 eos, byte b -> b + 3 (vocab 259). Needs no files."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local transformers tokenizer with the same small interface as ByteTokenizer."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"data.tokenizer: cannot load a tokenizer from {path!r}: {e}. Point data.tokenizer at "
                            "a folder written by tokenizer.save_pretrained(), or set data.tokenizer: byte.") from e
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        self.bos_id = self.tok.bos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (Jinja), if its folder has one."""
        template = getattr(self.tok, "chat_template", None)
        return template if isinstance(template, str) and template.strip() else None

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """``messages`` rendered as text by the chat template, without a leading bos token (packing adds it)."""
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        bos = self.tok.bos_token
        if self.bos_id is not None and bos and text.startswith(bos):
            text = text[len(bos):]
        return text


class SentencePieceTokenizer:
    """A sentencepiece model file (ids: 0 pad, 1 bos, 2 eos, 3 unk when desmoe trained it)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"data.tokenizer: cannot load the sentencepiece model {path!r}: {e}. Point it at a "
                            ".model file written by sentencepiece, or set data.tokenizer: sentencepiece to train "
                            "one on the configured domains.") from e
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = max(self.sp.pad_id(), 0)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.pad_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))


def spm_cache_dir() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.environ.get("DESMOE_CACHE", os.path.join(root, ".cache", "desmoe"))


def train_sentencepiece(data_cfg, examples: dict[str, list[list[Segment]]] | None = None) -> str:
    """Train (once) a sentencepiece model on every configured domain's text and cache it.

    The cache key is the corpus and the vocabulary size, so the same data reuses the same
    file; the model is written to a temporary name and renamed, so a reader never sees half
    a file. ``examples`` (from load_domain_examples) avoids reading the data again. Returns the
    model path.
    """
    import hashlib
    import tempfile

    import sentencepiece as spm

    texts = [t for exs in load_domain_texts(data_cfg, examples).values() for t in exs]
    digest = hashlib.sha256(f"{data_cfg.spm_vocab_size}\0".encode())
    for t in texts:
        digest.update(t.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    path = os.path.join(spm_cache_dir(), f"spm-{data_cfg.spm_vocab_size}-{digest.hexdigest()[:16]}.model")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(" ".join(t.split("\n")) + "\n")
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=data_cfg.spm_vocab_size,
                                       model_type="bpe", character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2,
                                       unk_id=3, byte_fallback=True, input_sentence_size=200000,
                                       shuffle_input_sentence=True, num_threads=1, minloglevel=2)
        os.replace(prefix + ".model", path)
    return path


def build_tokenizer(data_cfg, model_cfg, examples: dict[str, list[list[Segment]]] | None = None):
    """``data.tokenizer`` -> tokenizer; default: the model directory's tokenizer (HF files, or a bare
    ``tokenizer.model`` / ``sentencepiece.model``), else bytes.

    ``sentencepiece`` trains (or reuses from the cache) a model on the configured domains; a path
    ending in ``.model`` loads a sentencepiece file; any other path, a transformers tokenizer folder.
    """
    choice = data_cfg.tokenizer
    if choice == "byte":
        return ByteTokenizer()
    if choice == "sentencepiece":
        return SentencePieceTokenizer(train_sentencepiece(data_cfg, examples))
    if choice is not None and choice.endswith(".model"):
        return SentencePieceTokenizer(choice)
    if choice is not None:
        return HFTokenizer(choice)
    if model_cfg.path is not None:
        if any(os.path.isfile(os.path.join(model_cfg.path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return HFTokenizer(model_cfg.path)
        for name in ("tokenizer.model", "sentencepiece.model"):  # a bare sentencepiece model (desmoe export writes
            if os.path.isfile(os.path.join(model_cfg.path, name)):  # sentencepiece.model)
                return SentencePieceTokenizer(os.path.join(model_cfg.path, name))
    return ByteTokenizer()


def chat_template_segments(messages: list[dict], tokenizer, where: str) -> list[Segment]:
    """A chat rendered by the tokenizer's own template, as segments; loss on the assistant turns only.

    The conversation is rendered message by message: the text each assistant message adds
    (its content and the template's end-of-turn marker) is trained; headers, the generation
    prompt and every other message are not. A template that does not render a conversation's
    beginning as a prefix of the whole cannot be split this way and is reported.
    """
    segments: list[Segment] = []
    done = ""

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.render_chat(messages[:upto], add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja templates raise their own errors (e.g. "roles must alternate")
            raise DataError(f"{where}: the tokenizer's chat template cannot render messages[:{upto}] "
                            f"({type(e).__name__}: {e}). Fix the conversation, or set data.chat_template: desmoe "
                            "to use desmoe's own <|role|> rendering.") from None

    def extend(text: str, trained: bool, upto: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise DataError(f"{where}: the tokenizer's chat template does not render the conversation "
                            f"incrementally (messages[:{upto}] does not begin with the rendering of the messages "
                            "before it: the template rewrites earlier turns), so the assistant turns cannot be "
                            "located. Set data.chat_template: desmoe to use desmoe's own <|role|> rendering.")
        if len(text) > len(done):
            segments.append((text[len(done):], trained))
        done = text

    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            extend(render(i, True), False, i)
            extend(render(i + 1, False), True, i + 1)
        else:
            extend(render(i + 1, False), False, i + 1)
    if not any(trained and text for text, trained in segments):
        raise DataError(f"{where}: the tokenizer's chat template rendered no assistant text, so nothing to train "
                        "on. Set data.chat_template: desmoe to use desmoe's own <|role|> rendering.")
    return segments


def render_segments(example: list[Segment], tokenizer, *, chat_template: str = "auto") -> list[Segment]:
    """The segments to tokenise: a chat example through the tokenizer's own chat template when it has
    one and ``chat_template`` is 'auto'; any other example (or 'desmoe') as it is."""
    if (isinstance(example, ChatExample) and chat_template == "auto"
            and getattr(tokenizer, "chat_template", None) is not None):
        return chat_template_segments(example.messages, tokenizer, example.where)
    return example


def encode_example(segments: list[Segment], tokenizer, *, chat_template: str = "auto") -> tuple[list[int], list[int]]:
    """(ids, labels) of one example: labels are the ids on trained segments, IGNORE_INDEX elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in render_segments(segments, tokenizer, chat_template=chat_template):
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def eval_pair(example: list[Segment], tokenizer, *, chat_template: str = "auto") -> tuple[str, str] | None:
    """(prompt, reference) to evaluate an example by generation, or None for a plain text.

    The reference is the example's last trained segment (a response; the answer of a built-in
    math example; a chat's last assistant message, its content only) and the prompt all the
    text before it, rendered as in training (chat template included), so the model continues
    the prompt with the answer.
    """
    segments = render_segments(example, tokenizer, chat_template=chat_template)
    last = max((i for i, (_, trained) in enumerate(segments) if trained), default=None)
    if last is None or last == 0:
        return None
    prompt = example_text(segments[:last])
    if isinstance(example, ChatExample):
        reference = [m["content"] for m in example.messages if m["role"] == "assistant"][-1]
    else:
        reference = segments[last][0]
    return prompt, reference


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """The ids to generate from for an eval pair's prompt: bos (as packing puts it) and the prompt's tokens."""
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)

