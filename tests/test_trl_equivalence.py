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

from orpo.collate import make_collator, tokenize_pair
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


@pytest.fixture(params=["tiny-llama", pytest.param("smollm2", marks=pytest.mark.slow)])
def model_and_tokenizer(request):
    """The tiny random Llama, and the real SmolLM2-135M-Instruct (its 49k vocabulary and chat template)."""
    if request.param == "tiny-llama":
        return request.getfixturevalue("tiny_model_and_tokenizer")
    from transformers import AutoModelForCausalLM

    from orpo.models import load_tokenizer

    path = str(request.getfixturevalue("smollm2_dir"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), load_tokenizer(path)


@pytest.fixture()
def trl_trainer(model_and_tokenizer, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tokenizer = model_and_tokenizer
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
    for pair, trl_features in zip(PAIRS, _our_features_from_trl_rows(rows), strict=True):
        ours = tokenize_pair(_conversational(*pair), tokenizer, max_length=256, max_prompt_length=128)
        assert ours["prompt_input_ids"] == trl_features["prompt_input_ids"]
        for side in ("chosen_input_ids", "rejected_input_ids"):
            assert ours[side][-1] != tokenizer.eos_token_id  # the template ends the turn with "<|im_end|>\n"
            assert trl_features[side] == ours[side] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("layout", ["stacked", "shared_prompt"])
@pytest.mark.parametrize(
    ("model_and_tokenizer", "chunk_size"),
    [("tiny-llama", 5), ("tiny-llama", 4096), pytest.param("smollm2", 32, marks=pytest.mark.slow)],
    indirect=["model_and_tokenizer"],
)
def test_loss_metrics_and_gradients_equal_trl(trl_trainer, chunk_size: int, layout: str, request) -> None:
    """Loss and metrics within 1e-5: absolute on the tiny model, relative on SmolLM2.

    Gradients, relative to each parameter's gradient norm: within 1e-5 on the tiny model (seen: 2.5e-7).
    On SmolLM2 within 1e-3 (seen: 1e-5 to 3e-5, varying with thread scheduling): measured against a
    float64 computation, the full-logits fp32 path (TRL's) is off by 1.5e-5 in the hidden-state gradient and
    ours by 2e-6, and backpropagation through 30 layers amplifies such differences ~20x in the last
    layers' norm weights. The float64 finite-difference test in test_loss.py is the exactness check.
    """
    trainer, model, _ = trl_trainer
    real_model = request.node.callspec.params["model_and_tokenizer"] == "smollm2"
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trl_batch = trainer.data_collator(rows)

    model.zero_grad()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, trl_batch, train_eval="train")
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    features = _our_features_from_trl_rows(rows)
    batch = make_collator(layout, pad_token_id=trainer.padding_value, pad_to_multiple_of=8)(features)
    seq = model_sequence_logps(model, batch, nll_on_prompt=True, chunk_size=chunk_size)
    out = ORPOLoss(orpo_lambda=LAMBDA)(seq, num_pairs=batch["num_pairs"])
    out.loss.backward()

    ours = out.metrics()
    assert ours["loss"] == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-5)
    for name in SHARED_METRICS:
        assert ours[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-5), name
    # Every TRL metric is either shared or one of the two logit means we deliberately do not compute.
    assert set(trl_metrics) - set(SHARED_METRICS) == {"logits/chosen", "logits/rejected"}
    for name, p in model.named_parameters():
        # Relative to each gradient's norm: elementwise ratios of near-zero entries are pure fp32 noise.
        error = float((p.grad - trl_grads[name]).norm() / trl_grads[name].norm().clamp(min=1e-12))
        assert error < (1e-3 if real_model else 1e-5), f"{name}: relative gradient error {error:.2e}"
    # The batch is not degenerate: the preference term matters and the pairs disagree.
    assert abs(trl_metrics["log_odds_chosen"]) > 1e-4
