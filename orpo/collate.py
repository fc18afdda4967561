"""From preference pairs to token batches: chat template, truncation, collation, length grouping.

A pair `{"chosen": [...messages], "rejected": [...messages]}` (optionally with `prompt`) becomes prompt
tokens shared by both sides and the two response token lists (`tokenize_pair`). Two batch layouts put
chosen and rejected through the model in one forward pass:

- `SharedPromptCollator` (the default for training): one row per pair, prompt + chosen + rejected, with
  position ids and a 4D attention mask under which the rejected response sees the prompt but not the
  chosen response. The prompt is computed once and a pair has no padding of its own.
- `PreferenceCollator`: 2B rows [chosen_1..chosen_B; rejected_1..rejected_B], each prompt + response (the
  layout of TRL and the official code; any attention implementation can run it).

`length_grouped_indices` orders pairs so that a batch holds pairs of similar length, which cuts the
padding `padding_stats` measures.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from orpo.chat_template import template_of

log = logging.getLogger(__name__)

_warned_not_prefix: set[int] = set()


def _as_messages(value: Any, role: str, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(
        f"field {field!r} must be a string or a list of {{'role', 'content'}} messages, got {type(value).__name__}"
    )


def split_conversation(example: dict[str, Any]) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen assistant message, rejected assistant message) of a preference example.

    Accepts full conversations (`chosen` = [user, ..., assistant], the UltraFeedback-binarized layout) and
    TRL's layout (`prompt` = messages or a string, `chosen`/`rejected` = the assistant message(s) or strings).
    """
    for field in ("chosen", "rejected"):
        if field not in example:
            raise ValueError(f"preference example has no {field!r} field (keys: {sorted(example)})")
    chosen = _as_messages(example["chosen"], "assistant", "chosen")
    rejected = _as_messages(example["rejected"], "assistant", "rejected")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"field {field!r} must end with an assistant message")
    if len(chosen) > 1:
        prompt = chosen[:-1]
        if len(rejected) > 1 and rejected[:-1] != prompt:
            raise ValueError("'chosen' and 'rejected' conversations differ before their last assistant message")
    elif len(rejected) > 1:
        prompt = rejected[:-1]
    elif "prompt" in example and example["prompt"] is not None:
        prompt = _as_messages(example["prompt"], "user", "prompt")
    else:
        raise ValueError("preference example has no prompt: give 'prompt' or full conversations in 'chosen'")
    return prompt, chosen[-1], rejected[-1]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    template = template_of(tokenizer)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def _encode(tokenizer, text: str) -> list[int]:
    # The template already wrote any BOS/EOS it wants; the tokenizer must not add more.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _response_text(tokenizer, prompt_text: str, prompt: list[dict], answer: dict) -> str:
    full_text = _render(tokenizer, [*prompt, answer], add_generation_prompt=False)
    if full_text.startswith(prompt_text):
        return full_text[len(prompt_text) :]
    # Some templates render the last assistant turn differently from the generation prompt (e.g. they
    # strip reasoning). Then the response is the message text plus EOS, written after the prompt.
    if id(tokenizer) not in _warned_not_prefix:
        _warned_not_prefix.add(id(tokenizer))
        log.warning(
            "the chat template's generation prompt is not a prefix of the full conversation; "
            "using the assistant message + EOS as the response"
        )
    return answer["content"] + (tokenizer.eos_token or "")


def shared_prompt_length(prompt_ids: list[int], *full_ids: list[int]) -> int:
    """How many leading tokens of `prompt_ids` every tokenized full conversation starts with.

    Usually all of them. Less when the tokenizer merges the prompt's last characters with the response's
    first ones (a BPE merge across the boundary); those tokens then belong to the responses.
    """
    length = len(prompt_ids)
    for ids in full_ids:
        same = 0
        for a, b in zip(prompt_ids[:length], ids, strict=False):
            if a != b:
                break
            same += 1
        length = min(length, same)
    return length


def tokenize_pair(example: dict[str, Any], tokenizer, max_length: int, max_prompt_length: int) -> dict[str, Any]:
    """Tokenize one preference pair with the tokenizer's chat template (`orpo.chat_template.template_of`:
    a tokenizer without one gets turns closed by its EOS token, and BOS as its post-processor adds it).

    The prompt is the conversation before the last assistant message, rendered with the generation prompt
    (what the model sees before answering at inference). Each response is the rest of its full rendered
    conversation, so it includes the template's end-of-turn tokens. Each full conversation is tokenized in
    one piece and split after the prompt's tokens, so response tokens are those the model would produce
    after the prompt (tokenizing a response alone can differ, e.g. SentencePiece's leading space). Where a
    tokenizer merges across the boundary, the merged token goes to the responses (`shared_prompt_length`).

    Truncation: the prompt keeps its last `max_prompt_length` tokens (the question usually ends it), each
    response keeps its first `max_length - prompt_length` tokens.

    Returns prompt_input_ids, chosen_input_ids, rejected_input_ids (responses only), their lengths, and
    `length` = prompt_length + max(chosen_length, rejected_length), the padded row length of the pair in
    the stacked layout (`row_length` gives it per layout).
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
    prompt, chosen, rejected = split_conversation(example)
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True)
    prompt_ids = _encode(tokenizer, prompt_text)
    chosen_full = _encode(tokenizer, prompt_text + _response_text(tokenizer, prompt_text, prompt, chosen))
    rejected_full = _encode(tokenizer, prompt_text + _response_text(tokenizer, prompt_text, prompt, rejected))
    split = shared_prompt_length(prompt_ids, chosen_full, rejected_full)
    prompt_ids = prompt_ids[:split][-max_prompt_length:]
    budget = max_length - len(prompt_ids)
    chosen_ids = chosen_full[split:][:budget]
    rejected_ids = rejected_full[split:][:budget]
    feature = {
        "prompt_input_ids": prompt_ids,
        "chosen_input_ids": chosen_ids,
        "rejected_input_ids": rejected_ids,
        "prompt_length": len(prompt_ids),
        "chosen_length": len(chosen_ids),
        "rejected_length": len(rejected_ids),
    }
    return {**feature, "length": row_length(feature, "stacked")}


class _PaddingCollator:
    """What both layouts share: the pad token, and rows right-padded to a multiple of `pad_to_multiple_of`."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
        if pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def padded_length(self, longest: int) -> int:
        return -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of


class PreferenceCollator(_PaddingCollator):
    """Stack B tokenized pairs as 2B right-padded rows: [chosen_1..chosen_B; rejected_1..rejected_B].

    Row i is prompt_i + chosen_i, row B + i is prompt_i + rejected_i; T is the longest row rounded up to a
    multiple of `pad_to_multiple_of`. Masks are long tensors; `completion_mask` marks response tokens,
    `prompt_mask` prompt tokens, `attention_mask` both. `num_pairs` is the int B.

    Example (pad_token_id=0, pad_to_multiple_of=4):

        features = [{"prompt_input_ids": [1, 2], "chosen_input_ids": [3, 4], "rejected_input_ids": [5]},
                    {"prompt_input_ids": [6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9, 10]}]
        input_ids       = [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 10]]
        attention_mask  = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
        completion_mask = [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1]]
        prompt_mask     = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
        num_pairs       = 2
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows: list[tuple[list[int], list[int]]] = []  # (prompt ids, response ids)
        for side in ("chosen_input_ids", "rejected_input_ids"):
            rows.extend((list(f["prompt_input_ids"]), list(f[side])) for f in features)
        length = self.padded_length(max(len(p) + len(r) for p, r in rows))
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        completion_mask = torch.zeros_like(attention_mask)
        prompt_mask = torch.zeros_like(attention_mask)
        for i, (prompt, response) in enumerate(rows):
            p, n = len(prompt), len(prompt) + len(response)
            input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
            attention_mask[i, :n] = 1
            prompt_mask[i, :p] = 1
            completion_mask[i, p:n] = 1
        real = int(attention_mask.sum())
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "prompt_mask": prompt_mask,
            "num_pairs": len(features),
            "conversation_tokens": real,
            "input_tokens": real,
        }


class SharedPromptCollator(_PaddingCollator):
    """One right-padded row per pair, prompt + chosen + rejected: the prompt goes through the model once.

    Row i holds prompt_i, chosen_i, rejected_i, then padding up to the longest row rounded up to a multiple
    of `pad_to_multiple_of`. `position_ids` restart the rejected response where the prompt ends, and the
    boolean `attention_mask` (B, 1, T, T) is causal except that rejected tokens never see the chosen
    response, so every response token gets the hidden states it would get in its own row prompt + response
    (the layout of `PreferenceCollator`). Padding queries attend causally (their outputs are unused, but a
    fully masked query row would be NaN).

    Because the rows are no longer "token t predicts token t+1" (the first rejected token is predicted from
    the prompt's last position), the batch lists its labels explicitly, one entry per predicted token:
    `label_positions` (index into the flattened (B*T) positions of the hidden state that predicts it),
    `label_ids` (the token), `label_sequences` (i for chosen_i, B + i for rejected_i: the row of the
    stacked layout) and `label_is_prompt` (prompt tokens 2..P, counted once, under the chosen sequence; they
    enter the NLL only with `nll_on_prompt`). `row_bounds` (B, 3) holds each row's chosen start, rejected
    start and end, from which `orpo.shared_attention` computes the mask's attention without the mask.
    `conversation_tokens` counts the pairs' tokens as two conversations (2P + C + R, what the stacked layout
    holds), `input_tokens` the non-padding positions computed (P + C + R).

    Example (pad_token_id=0, pad_to_multiple_of=4), one pair with prompt [1, 2], chosen [3, 4], rejected [5]:

        input_ids       = [[1, 2, 3, 4, 5, 0, 0, 0]]
        position_ids    = [[0, 1, 2, 3, 2, 0, 0, 0]]
        attention_mask[0, 0, 4] = [1, 1, 0, 0, 1, 0, 0, 0]  (token 5 sees the prompt and itself)
        label_positions = [0, 1, 2, 1], label_ids = [2, 3, 4, 5]
        label_sequences = [0, 0, 0, 1], label_is_prompt = [1, 0, 0, 0]
        row_bounds      = [[2, 4, 5]]
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        pairs = [
            (list(f["prompt_input_ids"]), list(f["chosen_input_ids"]), list(f["rejected_input_ids"]))
            for f in features
        ]
        num_pairs = len(pairs)
        length = self.padded_length(max(len(p) + len(c) + len(r) for p, c, r in pairs))
        input_ids = torch.full((num_pairs, length), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((num_pairs, length), dtype=torch.long)
        positions, ids, sequences, is_prompt = [], [], [], []

        def add_labels(sources: torch.Tensor, targets: list[int], sequence: int, prompt: bool) -> None:
            keep = sources >= 0  # a token at position 0 has nothing to predict it
            positions.append(sources[keep] + row * length)
            ids.append(torch.tensor(targets, dtype=torch.long)[keep])
            sequences.append(torch.full((int(keep.sum()),), sequence, dtype=torch.long))
            is_prompt.append(torch.full((int(keep.sum()),), prompt, dtype=torch.bool))

        bounds = torch.zeros((num_pairs, 3), dtype=torch.long)  # chosen start, rejected start, end
        conversation_tokens = 0
        for row, (prompt, chosen, rejected) in enumerate(pairs):
            p, c, r = len(prompt), len(chosen), len(rejected)
            input_ids[row, : p + c + r] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
            position_ids[row, : p + c] = torch.arange(p + c)
            position_ids[row, p + c : p + c + r] = torch.arange(p, p + r)
            bounds[row] = torch.tensor([p, p + c, p + c + r])
            conversation_tokens += 2 * p + c + r
            add_labels(torch.arange(max(p - 1, 0)), prompt[1:], row, True)
            add_labels(torch.arange(p - 1, p + c - 1), chosen, row, False)
            # The first rejected token follows the prompt's last token, not the chosen response's.
            rejected_sources = torch.cat([torch.tensor([p - 1]), torch.arange(p + c, p + c + r - 1)])[:r]
            add_labels(rejected_sources, rejected, num_pairs + row, False)

        query = torch.arange(length).view(1, length, 1)
        key = torch.arange(length).view(1, 1, length)
        chosen_start, rejected_start, end = (bounds[:, i].view(-1, 1, 1) for i in range(3))
        rejected_query = (query >= rejected_start) & (query < end)
        chosen_key = (key >= chosen_start) & (key < rejected_start)
        attention_mask = (key <= query) & ~(rejected_query & chosen_key)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": attention_mask.unsqueeze(1),
            "label_positions": torch.cat(positions),
            "label_ids": torch.cat(ids),
            "label_sequences": torch.cat(sequences),
            "label_is_prompt": torch.cat(is_prompt),
            "row_bounds": bounds,
            "num_pairs": num_pairs,
            "conversation_tokens": conversation_tokens,
            "input_tokens": int(bounds[:, 2].sum()),
        }


BATCH_LAYOUTS = {"shared_prompt": SharedPromptCollator, "stacked": PreferenceCollator}


def make_collator(layout: str, pad_token_id: int, pad_to_multiple_of: int = 8):
    """The collator of a batch layout: "shared_prompt" or "stacked"."""
    if layout not in BATCH_LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; use one of {sorted(BATCH_LAYOUTS)}")
    return BATCH_LAYOUTS[layout](pad_token_id, pad_to_multiple_of)


def row_length(feature: dict[str, Any], layout: str) -> int:
    """Tokens a tokenized pair occupies in one row of `layout` (what length grouping sorts by)."""
    if layout == "shared_prompt":
        return feature["prompt_length"] + feature["chosen_length"] + feature["rejected_length"]
    return feature["prompt_length"] + max(feature["chosen_length"], feature["rejected_length"])


def length_grouped_indices(lengths: list[int], batch_size: int, seed: int, mega_batch_mult: int = 50) -> list[int]:
    """A permutation of range(len(lengths)) whose consecutive `batch_size` slices hold similar lengths.

    Like transformers' LengthGroupedSampler: shuffle (seeded), cut into mega-batches of
    `mega_batch_mult * batch_size`, sort each by length (longest first), cut into batches. Then the batches
    of each mega-batch are shuffled too, so training does not see lengths in descending order, and the
    batch holding the longest pair goes first, so an out-of-memory shows at step one. Same seed, same order.
    """
    if batch_size <= 0 or mega_batch_mult <= 0:
        raise ValueError("batch_size and mega_batch_mult must be positive")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * mega_batch_mult
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        group_batches = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        rng.shuffle(group_batches)
        batches.extend(group_batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches for i in batch]


def padding_stats(batch: dict[str, Any]) -> dict[str, float]:
    """Real tokens, padding tokens and their share in a collated batch (`padding_fraction` metric)."""
    mask = batch["attention_mask"]
    total = batch["input_ids"].numel() if "input_ids" in batch else mask.numel()
    real = batch["input_tokens"] if "input_tokens" in batch else int(mask.sum())
    return {
        "real_tokens": float(real),
        "padding_tokens": float(total - real),
        "total_tokens": float(total),
        "padding_fraction": (total - real) / total if total else 0.0,
    }
