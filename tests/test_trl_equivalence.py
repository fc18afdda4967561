"""Our ORPO loss and metrics equal trl.experimental.orpo.ORPOTrainer's on the same model, tokens and batch.

TRL is driven directly: an ORPOTrainer is built on the tiny model (fp32, `bf16=False`), its own dataset
pipeline tokenizes the pairs (chat template, then `tokenize_row`), its own collator pads them, and its
`get_batch_loss_metrics` computes the loss. The same token ids go through our collator, our chunked
log-prob path (`nll_on_prompt=True`, TRL's NLL over prompt + response) and `ORPOLoss`.

Differences by definition, not compared:
- `logits/chosen`, `logits/rejected`: TRL's mean raw logit over the whole padded (B, T, V) logits. We
  never materialise those logits (that is the point of the chunked path), so we do not log them.
- Tokenization: TRL appends an EOS after the chat template's own end of turn (`<|im_end|>\\n` becomes
  `<|im_end|>\\n<|im_end|>`); `tokenize_pair` keeps the template's text exactly. The test pins this down
  (TRL's response ids = ours + [EOS]) and feeds TRL's ids to both sides.
- TRL averages its stored metrics over logging steps and processes; the values compared here are one
  batch's, before any such averaging.
"""

from __future__ import annotations

import pytest
import torch

from orpo.collate import PreferenceCollator, tokenize_pair
from orpo.logprobs import model_sequence_logps
from orpo.loss import ORPOLoss

LAMBDA = 0.25
SHARED_METRICS = [
    "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
    "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
]
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I am not sure, I cannot help."),
    ("Please write a short poem about the sea.", "The sea is blue and wide.", "No."),
    ("Two plus two?", "Two plus two equals four.", "Water boils at 100 degrees Celsius at sea level."),
]


def _conversational(prompt: str, chosen: str, rejected: str) -> dict:
    """TRL's conversational layout (prompt turn separate from the answers)."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


@pytest.fixture()
def trl_trainer(tiny_model_and_tokenizer, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tokenizer = tiny_model_and_tokenizer
    args = ORPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        beta=LAMBDA,
        max_length=256,
        per_device_train_batch_size=len(PAIRS),
        gradient_checkpointing=False,
        report_to="none",
        seed=0,
    )
    dataset = Dataset.from_list([_conversational(*pair) for pair in PAIRS])
    trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainer, model, tokenizer


def _our_features_from_trl_rows(rows: list[dict]) -> list[dict]:
    """TRL's token ids, split back into shared prompt and responses."""
    features = []
    for row in rows:
        prompt_len = sum(1 for label in row["chosen_labels"] if label == -100)
        assert row["chosen_input_ids"][:prompt_len] == row["rejected_input_ids"][:prompt_len]
        features.append({
            "prompt_input_ids": row["chosen_input_ids"][:prompt_len],
            "chosen_input_ids": row["chosen_input_ids"][prompt_len:],
            "rejected_input_ids": row["rejected_input_ids"][prompt_len:],
        })
    return features


def test_tokenization_matches_trl_up_to_its_extra_eos(trl_trainer) -> None:
    trainer, _, tokenizer = trl_trainer
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    for pair, trl_features in zip(PAIRS, _our_features_from_trl_rows(rows)):
        ours = tokenize_pair(_conversational(*pair), tokenizer, max_length=256, max_prompt_length=128)
        assert ours["prompt_input_ids"] == trl_features["prompt_input_ids"]
        for side in ("chosen_input_ids", "rejected_input_ids"):
            assert ours[side][-1] != tokenizer.eos_token_id  # the template ends the turn with "<|im_end|>\n"
            assert trl_features[side] == ours[side] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("chunk_size", [5, 4096])
def test_loss_metrics_and_gradients_equal_trl(trl_trainer, chunk_size: int) -> None:
    trainer, model, _ = trl_trainer
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trl_batch = trainer.data_collator(rows)

    model.zero_grad()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, trl_batch, train_eval="train")
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    features = _our_features_from_trl_rows(rows)
    batch = PreferenceCollator(pad_token_id=trainer.padding_value, pad_to_multiple_of=8)(features)
    seq = model_sequence_logps(model, batch, nll_on_prompt=True, chunk_size=chunk_size)
    out = ORPOLoss(orpo_lambda=LAMBDA)(seq, num_pairs=batch["num_pairs"])
    out.loss.backward()

    ours = out.metrics()
    assert ours["loss"] == pytest.approx(trl_loss.item(), abs=1e-5)
    for name in SHARED_METRICS:
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    # Every TRL metric is either shared or one of the two logit means we deliberately do not compute.
    assert set(trl_metrics) - set(SHARED_METRICS) == {"logits/chosen", "logits/rejected"}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # The batch is not degenerate: the preference term matters and the pairs disagree.
    assert abs(trl_metrics["log_odds_chosen"]) > 1e-4
