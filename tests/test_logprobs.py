"""Chunked log-probs equal the full-logits path (values and gradients), and never build (2B, T, V) logits."""

from __future__ import annotations

import pytest
import torch

from orpo.collate import PreferenceCollator, tokenize_pair
from orpo.logprobs import SequenceLogps, chunked_sequence_logps, model_sequence_logps, plain_sequence_logps
from orpo.loss import ORPOLoss

EXAMPLES = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "I am not sure, I cannot help with that question."},
    {"prompt": "Please write a short poem about the sea.", "chosen": "The quick brown fox jumps.",
     "rejected": "No."},
    {"prompt": "Two plus two?", "chosen": "Two plus two equals four.", "rejected": "Five."},
]


def _batch(tokenizer, pairs: int = 3) -> dict:
    features = [tokenize_pair(e, tokenizer, max_length=96, max_prompt_length=48) for e in EXAMPLES[:pairs]]
    return PreferenceCollator(tokenizer.pad_token_id)(features)


def _reference_logps(hidden, weight, bias, batch, nll_on_prompt, scale=None, softcap=None) -> SequenceLogps:
    """Straightforward full-logits computation, written independently of orpo.logprobs."""
    logits = (hidden @ weight.t() + (bias if bias is not None else 0)).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    comp = batch["completion_mask"][:, 1:].float()
    rows = hidden.shape[0] // 2
    nll_mask = (batch["attention_mask"][:, 1:].float() if nll_on_prompt else comp)[:rows]
    return SequenceLogps(
        logps=(logprobs * comp).sum(1) / comp.sum(1),
        nll_sum=-(logprobs[:rows] * nll_mask).sum(),
        nll_tokens=nll_mask.sum(),
        completion_tokens=comp.sum(1),
    )


def _objective(seq: SequenceLogps) -> torch.Tensor:
    # Touches every output with distinct weights, so each gradient path is checked.
    return ORPOLoss(0.3)(seq, num_pairs=seq.logps.shape[0] // 2).loss + 0.1 * seq.logps.sum()


def _random_batch(rows: int = 4, length: int = 12, vocab: int = 50, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    attention = torch.zeros(rows, length, dtype=torch.long)
    completion = torch.zeros_like(attention)
    for r in range(rows):
        prompt = 2 + r % 3
        end = length - (r % 4)
        attention[r, :end] = 1
        completion[r, prompt:end] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
@pytest.mark.parametrize("transform", [(None, None, False), (0.5, None, True), (None, 3.0, False)])
def test_chunked_equals_full_logits_values_and_gradients(nll_on_prompt, chunk_size, transform) -> None:
    scale, softcap, with_bias = transform
    batch = _random_batch()
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 12, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True) if with_bias else None

    got = chunked_sequence_logps(
        hidden, weight, batch["input_ids"], batch["completion_mask"], batch["attention_mask"],
        nll_on_prompt=nll_on_prompt, chunk_size=chunk_size, lm_head_bias=bias, logit_scale=scale,
        logit_softcap=softcap,
    )
    want = _reference_logps(hidden, weight, bias, batch, nll_on_prompt, scale, softcap)
    for field in ("logps", "nll_sum", "nll_tokens", "completion_tokens"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5)

    leaves = [t for t in (hidden, weight, bias) if t is not None]
    got_grads = torch.autograd.grad(_objective(got), leaves)
    want_grads = torch.autograd.grad(_objective(want), leaves)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_nll_tokens_count_prompt_only_when_asked() -> None:
    batch = _random_batch()
    hidden, weight = torch.randn(4, 12, 8), torch.randn(50, 8)
    args = (hidden, weight, batch["input_ids"], batch["completion_mask"], batch["attention_mask"])
    response_only = chunked_sequence_logps(*args, nll_on_prompt=False, chunk_size=4)
    with_prompt = chunked_sequence_logps(*args, nll_on_prompt=True, chunk_size=4)
    chosen = slice(0, 2)
    assert response_only.nll_tokens == batch["completion_mask"][chosen, 1:].sum()
    # Prompt + response of the chosen rows, minus their first token (nothing predicts it).
    assert with_prompt.nll_tokens == batch["attention_mask"][chosen].sum() - 2
    torch.testing.assert_close(response_only.logps, with_prompt.logps)


def test_chunked_path_never_allocates_full_logits() -> None:
    """Record every tensor the forward and backward create: none may approach (tokens x V)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    rows, length, width, vocab, chunk = 4, 128, 8, 2048, 16
    batch = _random_batch(rows, length, vocab)
    hidden = torch.randn(rows, length, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    with Largest():
        seq = chunked_sequence_logps(
            hidden, weight, batch["input_ids"], batch["completion_mask"], batch["attention_mask"],
            nll_on_prompt=True, chunk_size=chunk,
        )
        _objective(seq).backward()
    full_logits = rows * length * vocab
    assert Largest.biggest <= max(chunk * vocab, vocab * width)  # a chunk of logits, or the weight gradient
    assert Largest.biggest * 16 <= full_logits


@pytest.fixture()
def tiny_model():
    from orpo.models import build_tiny_llama

    model, tokenizer = build_tiny_llama(seed=0, hidden_size=32, layers=2)
    return model.eval(), tokenizer


def _compare_model_paths(model, batch, nll_on_prompt, chunk_size, params=None) -> None:
    params = params or [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    plain = plain_sequence_logps(model, batch, nll_on_prompt=nll_on_prompt)
    _objective(plain).backward()
    plain_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    chunked = model_sequence_logps(model, batch, nll_on_prompt=nll_on_prompt, chunk_size=chunk_size)
    _objective(chunked).backward()
    for field in ("logps", "nll_sum", "nll_tokens", "completion_tokens"):
        torch.testing.assert_close(getattr(chunked, field), getattr(plain, field), rtol=1e-5, atol=1e-5)
    for p, g in zip(params, plain_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("chunk_size", [3, "exact", 4096])
def test_model_path_equals_plain_path(tiny_model, nll_on_prompt, chunk_size) -> None:
    model, tokenizer = tiny_model
    batch = _batch(tokenizer)
    if chunk_size == "exact":  # one chunk holding exactly the projected tokens
        comp = batch["completion_mask"][:, 1:].clone()
        if nll_on_prompt:
            comp[:3] = batch["attention_mask"][:3, 1:]
        chunk_size = int(comp.sum())
    _compare_model_paths(model, batch, nll_on_prompt, chunk_size)


def test_model_path_with_gradient_checkpointing(tiny_model) -> None:
    model, tokenizer = tiny_model
    model.activation_checkpointing_enable()  # transformers 5's name for gradient checkpointing
    model.train()  # checkpointing is active in training mode only; the tiny Llama has no dropout
    _compare_model_paths(model, _batch(tokenizer), True, 5)


def test_model_path_with_peft_lora(tiny_model) -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    # LoRA B starts at zero, which would make every LoRA A gradient zero; give it values.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.ndim == 2 for p in trainable)
    _compare_model_paths(peft_model, _batch(tokenizer), False, 6, params=trainable)


def test_model_path_through_ddp_wrapper(tiny_model, tmp_path) -> None:
    """A 1-process gloo DDP wrapper: the forward goes through DDP and gradients equal the bare model's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, tokenizer = tiny_model
    batch = _batch(tokenizer)
    bare = model_sequence_logps(model, batch, nll_on_prompt=True, chunk_size=4)
    _objective(bare).backward()
    bare_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        seq = model_sequence_logps(wrapped, batch, nll_on_prompt=True, chunk_size=4)
        _objective(seq).backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(seq.logps, bare.logps)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, bare_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_model_path_never_builds_full_logits(tiny_model) -> None:
    """The model's own logits come out as (2B, 1, V): the hook hands lm_head only the last position."""
    model, tokenizer = tiny_model
    batch = _batch(tokenizer)
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        model_sequence_logps(model, batch, nll_on_prompt=False, chunk_size=8)
    finally:
        handle.remove()
    assert shapes == [(batch["input_ids"].shape[0], 1, model.config.vocab_size)]


def test_model_path_falls_back_to_full_logits_for_an_adapted_lm_head(tiny_model, caplog) -> None:
    """A LoRA on lm_head changes what the output embedding computes; the chunked path must not skip it."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model
    model.config.tie_word_embeddings = False
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch(tokenizer)
    with caplog.at_level("WARNING", logger="orpo.logprobs"):
        got = model_sequence_logps(peft_model, batch, nll_on_prompt=False, chunk_size=4)
    assert "not a plain nn.Linear" in caplog.text
    torch.testing.assert_close(got.logps, plain_sequence_logps(peft_model, batch, nll_on_prompt=False).logps)


@pytest.mark.parametrize("mode", ["bf16-autocast", "bf16-weights"])
def test_model_path_in_bfloat16_matches_plain_path(tiny_model, mode: str) -> None:
    """Mixed precision: the projection runs in bf16 like the model's own lm_head; log-softmax in float32."""
    model, tokenizer = tiny_model
    batch = _batch(tokenizer)
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast")
    params = [p for p in model.parameters() if p.requires_grad]
    with context:
        plain = plain_sequence_logps(model, batch, nll_on_prompt=True)
    plain_grads = torch.autograd.grad(_objective(plain), params)
    with context:
        chunked = model_sequence_logps(model, batch, nll_on_prompt=True, chunk_size=6)
    chunked_grads = torch.autograd.grad(_objective(chunked), params)
    assert chunked.logps.dtype == torch.float32
    # bf16 has 8 bits of mantissa; both paths round the same matmul, so they agree far better than that.
    torch.testing.assert_close(chunked.logps, plain.logps, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(chunked.nll_sum, plain.nll_sum, rtol=1e-2, atol=1e-2)
    for g_chunked, g_plain in zip(chunked_grads, plain_grads, strict=True):
        assert g_chunked.dtype == g_plain.dtype
        scale = g_plain.float().abs().max().clamp(min=1e-3)
        assert float((g_chunked.float() - g_plain.float()).abs().max() / scale) < 5e-2


def _ddp_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """One process of a 2-process gloo run: its own half of the pairs, DDP-wrapped tiny model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from orpo.models import build_tiny_llama

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model, tokenizer = build_tiny_llama(seed=0, hidden_size=32, layers=2)
        batch = _batch_of(tokenizer, [EXAMPLES[rank]])
        wrapped = DistributedDataParallel(model)
        seq = model_sequence_logps(wrapped, batch, nll_on_prompt=False, chunk_size=4)
        _objective(seq).backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out_dir}/grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def _batch_of(tokenizer, examples: list[dict]) -> dict:
    features = [tokenize_pair(e, tokenizer, max_length=96, max_prompt_length=48) for e in examples]
    return PreferenceCollator(tokenizer.pad_token_id)(features)


@pytest.mark.slow  # two spawned interpreters import torch and transformers (~60-90 s on 2 busy cores)
def test_ddp_two_processes_average_the_chunked_gradients(tmp_path) -> None:
    """Gradients that reach the weights only through the hook (lm_head / tied embedding included) are
    all-reduced by DDP: each process ends with the mean of the single-process gradients of both shards."""
    import torch.multiprocessing as mp

    from orpo.models import build_tiny_llama

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    model, tokenizer = build_tiny_llama(seed=0, hidden_size=32, layers=2)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for example in EXAMPLES[:2]:
        model.zero_grad()
        seq = model_sequence_logps(model, _batch_of(tokenizer, [example]), nll_on_prompt=False, chunk_size=4)
        _objective(seq).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad / 2
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for n, g in expected.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {n}")


def test_model_path_falls_back_under_parameter_sharding(tiny_model, caplog) -> None:
    """Stand-in for FSDP (its wrapper class name is what is detected): full logits, same values."""
    model, tokenizer = tiny_model

    class FullyShardedDataParallel(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

        def get_output_embeddings(self):
            return self.module.get_output_embeddings()

    batch = _batch(tokenizer)
    with caplog.at_level("WARNING", logger="orpo.logprobs"):
        got = model_sequence_logps(FullyShardedDataParallel(model), batch, nll_on_prompt=True, chunk_size=4)
    assert "sharded" in caplog.text
    torch.testing.assert_close(got.logps, plain_sequence_logps(model, batch, nll_on_prompt=True).logps)
