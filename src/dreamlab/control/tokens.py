"""Prompts as the text encoder sees them: tokens, where a word's tokens are, and how the tokens of two
prompts align (prompt-to-prompt's ``seq_aligner``, written here as a plain Needleman-Wunsch).

Positions index the encoder's padded sequence (position 0 is the start token for BERT and CLIP), so
they index the key axis of cross-attention directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class Tokens:
    ids: list[int]  # the prompt's token ids, start and end tokens included, no padding
    text: list[str]  # each token as text
    words: list[str]  # the prompt's words, as a user names them

    def __len__(self) -> int:
        return len(self.ids)


def tokens(encoder, prompt: str) -> Tokens:
    """The prompt's tokens; a prompt longer than the encoder's length is an error naming it."""
    tok = encoder.tokenizer
    ids = tok(prompt, truncation=False)["input_ids"]
    if len(ids) > encoder.max_length:
        raise InvalidRequestError(f"the prompt {prompt!r} is {len(ids)} tokens long; this model's text encoder "
                                  f"reads at most {encoder.max_length}")
    return Tokens(ids, tok.convert_ids_to_tokens(ids), [w.strip(".,;:!?").lower() for w in prompt.split()])


def word_positions(encoder, prompt: str, word: str) -> list[int]:
    """Positions of the tokens of ``word`` (one or more words) in ``prompt``; an error naming the
    prompt's words if it is not there."""
    t = tokens(encoder, prompt)
    inner = encoder.tokenizer(word, add_special_tokens=False)["input_ids"]
    n = len(inner)
    hits = [i for i in range(len(t.ids) - n + 1) if n and t.ids[i:i + n] == inner]
    if not hits:
        raise InvalidRequestError(f"{word!r} is not a word of the prompt {prompt!r} (its words: {', '.join(t.words)})")
    return [i + k for i in hits for k in range(n)]


def align(source: list[int], target: list[int]) -> list[int]:
    """For each target position, the source position of the same token in a global alignment
    (Needleman-Wunsch: match +1, mismatch and gap -1), or -1 for a token the target adds."""
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = -i
    for j in range(1, m + 1):
        score[0][j] = -j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j] - 1, score[i][j - 1] - 1)
    mapper = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        if score[i][j] == score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1):
            if source[i - 1] == target[j - 1]:
                mapper[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j] - 1:
            i -= 1
        else:
            j -= 1
    return mapper


def cross_mapper(source: Tokens, target: Tokens, length: int, mode: str) -> tuple[Tensor, Tensor]:
    """(index (length,), weight (length,)): the edit's key position k takes the source's attention at
    ``index[k]`` with weight ``weight[k]`` (and its own with 1 - weight). ``replace`` (a word swap) maps
    position to position; ``refine`` (words added) maps aligned tokens and leaves new ones their own."""
    index = torch.arange(length)
    weight = torch.ones(length)
    if mode == "replace":
        if len(source) != len(target):
            raise InvalidRequestError(
                f"replace swaps words of equal token counts: the source prompt has {len(source)} tokens and the "
                f"target {len(target)} (use refine for added words)"
            )
        return index, weight
    mapper = align(source.ids, target.ids)
    for k, i in enumerate(mapper):
        index[k] = max(i, 0)
        weight[k] = 1.0 if i >= 0 else 0.0
    return index, weight
