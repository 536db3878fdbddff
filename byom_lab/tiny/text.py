"""Word-level tokenizer and caption vocabulary of the tiny CLIP."""
import re

import torch

PAD, SOT, EOT, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<sot>", "<eot>", "<unk>"]
CONTEXT_LENGTH = 16


def words(text: str) -> list:
    return re.findall(r"[a-z0-9]+", text.lower())


def code_word(task: str, k: int) -> str:
    """The caption word for a class whose real name never appears in pretraining captions."""
    return f"{task.replace('_', '')}{k}"


def build_vocab(tasks: dict, templates: list) -> list:
    """Every word the tiny suite can say: specials first, then sorted words."""
    vocab = set()
    for t in templates:
        vocab.update(words(t.replace("{c}", "").replace("{f}", "")))
    for spec in tasks.values():
        vocab.update(words(spec.family))
        for k, c in enumerate(spec.classes):
            vocab.update(words(c))
            if not spec.parent:
                vocab.add(code_word(spec.name, k))
    return SPECIALS + sorted(vocab)


class Tokenizer:
    """Maps text to (n, CONTEXT_LENGTH) token ids: <sot> words <eot> <pad>..."""

    def __init__(self, vocab: list, context_length: int = CONTEXT_LENGTH):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [SOT] + [self.index.get(w, UNK) for w in words(text)][: self.context_length - 2] + [EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out
