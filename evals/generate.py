"""Batched chat generation, AlpacaEval model outputs and MT-Bench two-turn answers.

Conversations are rendered with the tokenizer's chat template (generation prompt on), left-padded so
that every row's last prompt token sits at the same position, and decoded with the KV cache. Rows are
sorted by prompt length before batching so that a batch holds prompts of similar length (less padding);
results come back in the input order.

Output files use the official tools' formats:
- AlpacaEval `model_outputs.json`: `[{"instruction", "output", "generator", "dataset"}]`;
- FastChat answer JSONL: `{"question_id", "answer_id", "model_id", "choices": [{"index", "turns"}], "tstamp"}`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Message = dict[str, str]

# FastChat's llm_judge/common.py temperature_config: sampling temperature per MT-Bench category.
MT_BENCH_TEMPERATURES: dict[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
DEFAULT_TEMPERATURE = 0.7  # FastChat's default for a category it does not know


@dataclass
class Generation:
    """One generated reply: its text and how many tokens were generated (EOS and padding excluded)."""

    text: str
    new_tokens: int


def render_prompts(tokenizer, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt (template adds any BOS itself)."""
    from orpo.models import CHATML_TEMPLATE

    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    ids = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=True, chat_template=template
        )
        ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return ids


_SENTINEL = "\u2063ORPO-END-OF-REPLY\u2063"


def end_of_turn_marker(tokenizer) -> str | None:
    """The text the chat template writes right after an assistant reply (`<|im_end|>`, `</s>`, `<|eot_id|>`).

    Found by rendering a reply with the template and reading what follows it up to the first whitespace;
    None when the template writes nothing there.
    """
    from orpo.models import CHATML_TEMPLATE

    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
            tokenize=False, chat_template=template,
        )
    except Exception:  # noqa: BLE001 - a template that refuses this conversation has no marker to learn
        return None
    if _SENTINEL not in text:
        return None
    after = text.split(_SENTINEL, 1)[1].lstrip()
    marker = after.split()[0] if after.split() else ""
    return marker or None


def _stop_ids(model, tokenizer, marker: str | None = None) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if marker:
        # A marker that is one token (ChatML's <|im_end|> in a ChatML vocabulary) stops like EOS.
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(marker_ids) == 1 and marker_ids[0] not in ids:
            ids.append(marker_ids[0])
    return ids


def _reply_text(tokenizer, tokens: list[int], marker: str | None) -> str:
    """The reply up to the end-of-turn marker, without it and without special tokens."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    if marker:
        text = text.split(marker, 1)[0]
    # Special tokens are removed after the cut, so a marker that is itself a special token still cuts.
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    return text.strip()


def _count_new_tokens(row: list[int], stop_ids: set[int]) -> int:
    for position, token in enumerate(row):
        if token in stop_ids:
            return position
    return len(row)


def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float | None = 1.0,
    batch_size: int = 8,
    num_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> list[list[Generation]]:
    """Reply to each conversation; returns `num_samples` generations per conversation, in input order.

    `temperature == 0` decodes greedily (and then `num_samples` copies would be identical, so it must be 1).
    `top_p=None` samples with the model's own generation_config (top_p, top_k), as a bare `model.generate` does.
    Each batch is seeded from `seed` and its position, so a rerun with the same batch size reproduces the
    samples.
    """
    import torch
    from transformers import GenerationConfig

    if temperature == 0.0 and num_samples > 1:
        raise ValueError("num_samples > 1 needs temperature > 0; greedy decoding gives identical samples")
    if not conversations:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    marker = end_of_turn_marker(tokenizer)
    stop_ids = _stop_ids(model, tokenizer, marker)
    prompts = render_prompts(tokenizer, conversations)
    # Longest first: the first batch shows the worst-case memory right away.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    sampling = temperature > 0.0
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        num_return_sequences=num_samples,
        pad_token_id=pad_id,
        eos_token_id=stop_ids,
        # The turn also ends where the template's end-of-turn text appears, in however many tokens.
        stop_strings=[marker] if marker else None,
        use_cache=True,
    )
    device = next(model.parameters()).device
    results: list[list[Generation]] = [[] for _ in prompts]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    iterator: Any = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="generate", unit="batch")
    was_training = model.training
    model.eval()
    try:
        for number, batch in enumerate(iterator):
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):  # left padding: prompts end where generation starts
                ids = prompts[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            torch.manual_seed(seed + number)
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=gen_config,
                    tokenizer=tokenizer,
                )
            new = output[:, width:].tolist()
            for row, tokens in enumerate(new):
                index = batch[row // num_samples]
                count = _count_new_tokens(tokens, set(stop_ids))
                text = _reply_text(tokenizer, tokens[:count], marker)
                results[index].append(Generation(text=text, new_tokens=count))
    finally:
        model.train(was_training)
    return results


def generate_alpaca_outputs(
    model,
    tokenizer,
    instructions: Sequence[dict[str, Any]],
    *,
    generator: str,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Greedy replies to AlpacaEval instructions as `model_outputs.json` records."""
    replies = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": row["instruction"]}] for row in instructions],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return [
        {
            "instruction": row["instruction"],
            "output": reply[0].text,
            "generator": generator,
            "dataset": row.get("dataset", "alpaca_eval"),
        }
        for row, reply in zip(instructions, replies)
    ]


def generate_mt_bench_answers(
    model,
    tokenizer,
    questions: Sequence[dict[str, Any]],
    *,
    model_id: str,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    temperatures: dict[str, float] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Answer every turn of each MT-Bench question; turn k sees the model's own answers to turns < k.

    Questions are grouped by their category's temperature (FastChat's table), and each group is generated
    turn by turn in batches. Like FastChat's gen_model_answer, only the temperature is set: top_p and top_k
    stay the model's own. Returns FastChat answer records in the questions' order.
    """
    table = MT_BENCH_TEMPERATURES if temperatures is None else temperatures
    groups: dict[float, list[int]] = {}
    for index, question in enumerate(questions):
        groups.setdefault(table.get(question["category"], DEFAULT_TEMPERATURE), []).append(index)
    turns: list[list[str]] = [[] for _ in questions]
    for temperature, members in sorted(groups.items()):
        max_turns = max(len(questions[i]["turns"]) for i in members)
        for turn in range(max_turns):
            active = [i for i in members if len(questions[i]["turns"]) > turn]
            conversations = []
            for i in active:
                conversation: list[Message] = []
                for previous in range(turn):
                    conversation.append({"role": "user", "content": questions[i]["turns"][previous]})
                    conversation.append({"role": "assistant", "content": turns[i][previous]})
                conversation.append({"role": "user", "content": questions[i]["turns"][turn]})
                conversations.append(conversation)
            replies = generate(
                model,
                tokenizer,
                conversations,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=None,
                batch_size=batch_size,
                seed=seed + turn,
                progress=progress,
            )
            for i, reply in zip(active, replies):
                turns[i].append(reply[0].text)
    now = time.time()
    return [
        {
            "question_id": question["question_id"],
            "answer_id": uuid.uuid4().hex[:22],
            "model_id": model_id,
            "choices": [{"index": 0, "turns": answer_turns}],
            "tstamp": now,
        }
        for question, answer_turns in zip(questions, turns)
    ]


def write_json(records: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
