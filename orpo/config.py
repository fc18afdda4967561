"""The one configuration tree of the pipeline: typed, validated once, loaded from YAML.

Every default lives here. A config file only says what differs from these defaults, and `key=value`
overrides (dotted paths, YAML-typed values) are applied on top, so

    orpo train --config configs/demo.yaml train.learning_rate=1e-5 train.lora.r=8

changes exactly two values. Validation happens before any work starts, and an error names the key, the
value it got and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orpo.errors import UsageError


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(_Section):
    """Binarization of raw preference data into prompt/chosen/rejected pairs."""

    source: str = Field(
        "data/samples/ultrafeedback_sample.jsonl",
        description="Raw data: a local file (.jsonl/.json/.parquet), a directory or a glob of such files "
        "(shards, e.g. one file per day: drops/*.jsonl), or a hub id (openbmb/UltraFeedback, "
        "HuggingFaceH4/ultrafeedback_binarized, argilla/ultrafeedback-binarized-preferences-cleaned).",
    )
    incremental: bool = Field(
        False,
        description="With a directory or glob source and orchestration.start_from: champion, train only on "
        "shards the champion's data has not seen (default: all shards, the union).",
    )
    source_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `source`.")
    recipe: Literal["h4", "argilla", "max-min"] = Field("argilla", description="How chosen/rejected are picked.")
    seed: int = Field(42, description="Seed for the random choice of rejected completions.")
    test_size: float = Field(
        0.02, gt=0.0, lt=1.0, description="Share of prompts in the test split (by hash). A hub source with its own "
        "train/test split pair (train_prefs/test_prefs, or train/test) keeps that split instead.",
    )
    decontaminate: bool = Field(True, description="Drop truthful_qa records and prompts overlapping eval prompts.")
    decontamination_files: list[str] = Field(
        default_factory=list,
        description="Evaluation prompt files (MT-Bench question.jsonl, AlpacaEval json) to decontaminate against. "
        "Add TruthfulQA (TruthfulQA.csv, or truthful_qa rows with `question` as jsonl/parquet) to drop its "
        "questions that UltraFeedback holds under other sources, as the H4 and argilla-cleaned recipes did.",
    )
    decontamination_ngram: int = Field(13, ge=4, description="Shared word n-gram length that counts as overlap.")
    dedupe: bool = Field(True, description="Keep each prompt once.")
    fix_overall_score: bool = Field(False, description="Apply the 2023 UltraFeedback overall_score fix.")
    tokenizer: str | None = Field(
        None,
        description="Model spec whose tokenizer counts tokens for max_prompt_tokens / max_length (required with "
        "them; nothing falls back to the model's). Counted with the chat template training renders: "
        "model.chat_template when set, else the tokenizer's own, else the fallback.",
    )
    max_prompt_tokens: int | None = Field(None, gt=0, description="Drop pairs whose prompt is longer.")
    max_length: int | None = Field(None, gt=0, description="Drop pairs whose prompt+response is longer.")
    on_error: Literal["fail", "skip"] = Field("fail", description="Malformed records: stop, or count and skip.")
    export: Literal["jsonl", "parquet"] | None = Field(None, description="Also export the splits in this format.")
    output_dir: str | None = Field(None, description="Where the dataset goes (default: <workdir>/data/<key>).")


class ModelConfig(_Section):
    """The model to align: a hub id, a local directory, an MLflow models:/ URI, or a built-in name."""

    name_or_path: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Hub id, local path, models:/NAME@alias, builtin:smollm2-135m-instruct or builtin:tiny-llama.",
    )
    revision: str | None = Field(None, description="Hub revision.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = float32 on CPU, bfloat16 on GPUs that support it."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off unless you trust it.")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, flash_attention_2, eager.")
    cache_dir: str | None = Field(None, description="Where built-in models are converted (default: user cache).")
    chat_template: str | None = Field(
        None,
        description="Chat template to train and export with: a name (zephyr, chatml) or a Jinja file path. "
        "Default: the tokenizer's own; a tokenizer without one gets Zephyr-style turns closed by its EOS token.",
    )


class LoraConfig(_Section):
    enabled: bool = Field(True, description="LoRA adapters (true) or full fine-tuning (false).")
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt, or 'all-linear'.",
    )
    load_in_4bit: bool = Field(False, description="QLoRA: load the base model in 4 bit (needs bitsandbytes + GPU).")
    merge_on_export: bool = Field(False, description="Also export the adapter merged into the base model.")


class TrainConfig(_Section):
    """ORPO training (one phase, no reference model)."""

    orpo_lambda: float = Field(0.1, ge=0.0, description="Weight of the odds-ratio term (the paper's lambda).")
    nll_on_prompt: bool = Field(
        False, description="NLL over prompt+response like the official code and TRL (default: response only)."
    )
    max_length: int = Field(1024, gt=8, description="Max tokens of prompt+response.")
    max_prompt_length: int = Field(512, gt=0, description="Max prompt tokens (truncated from the left).")
    per_device_batch_size: int = Field(2, gt=0, description="Preference pairs per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides num_epochs when set.")
    learning_rate: float = Field(5e-6, gt=0.0)
    lr_scheduler: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "inverse_sqrt"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description="adamw_8bit needs bitsandbytes.")
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip gradients to this global norm; null: no clipping. Under DeepSpeed it "
        "replaces the accelerate config's gradient_clipping.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Compute dtype under autocast (weights and optimizer state stay float32): no on CPU; "
        "bf16 on modern GPUs.",
    )
    allow_low_precision_master_weights: bool = Field(
        False,
        description="Allow full fine-tuning of bf16/fp16-loaded weights without FSDP/DeepSpeed fp32 masters "
        "(small updates round away). Off: such a config is refused; use model.dtype float32 or auto.",
    )
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = Field(
        256,
        gt=0,
        description="Label positions projected through the output embedding at once: the loss's extra memory is "
        "a few chunk x vocab float32 buffers (256 x 49k: 50 MB each).",
    )
    pad_to_multiple_of: int = Field(8, gt=0)
    batch_layout: Literal["shared_prompt", "stacked"] = Field(
        "shared_prompt",
        description="shared_prompt: one row per pair (prompt once, chosen and rejected behind it, no padding "
        "between them); stacked: chosen and rejected rows as in TRL. Falls back to stacked for models that "
        "cannot take a 4D attention mask (flash-attention, ALiBi, short sliding windows).",
    )
    group_by_length: bool = Field(True, description="Batch pairs of similar length to cut padding.")
    logging_steps: int = Field(1, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Evaluate on the test split every N steps.")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, gt=0, description="Keep the last K checkpoints.")
    seed: int = 42
    output_dir: str | None = Field(None, description="Default: <workdir>/train/<run name>.")
    accelerate_config: str | None = Field(
        None, description="accelerate config file for `accelerate launch` (configs/accelerate/*.yaml)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    setup_self_check: bool = Field(
        True,
        description="Before training, compare on a few pairs of the first batch the shared-prompt layout with the "
        "stacked one and chunked log-probs with the model's own logits; fall back (stacked / full logits) where "
        "they differ, with the reason in the log. Costs three no-grad forwards; false trusts the model-type lists.",
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> TrainConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"train.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"train.max_length ({self.max_length}), or no response token fits"
            )
        return self


GatedMetric = Literal["head_to_head/win_rate", "mt_bench/score", "preference/accuracy"]


class GateConfig(_Section):
    """When a challenger replaces the champion.

    head_to_head (default): the challenger is compared with the champion on the same prompts (pairwise
    judged outputs, paired MT-Bench scores, paired preference accuracy), each difference with a confidence
    interval; it is promoted only when the primary metric's interval lies above `margin` and no other gated
    metric is significantly worse. threshold: the older point-estimate rules (the `min_`/`max_` keys).
    With no champion yet, the start model's evaluation stands in for the champion (`first_version`).
    """

    mode: Literal["head_to_head", "threshold"] = Field(
        "head_to_head",
        description="head_to_head: paired comparison with confidence intervals; threshold: point-estimate rules.",
    )
    primary_metric: GatedMetric = Field(
        "head_to_head/win_rate",
        description="head_to_head: the metric whose interval must clear `margin` for a promotion.",
    )
    gated_metrics: list[GatedMetric] = Field(
        default_factory=lambda: ["head_to_head/win_rate", "mt_bench/score", "preference/accuracy"],
        description="head_to_head: metrics compared; any of them significantly worse blocks the promotion.",
    )
    margin: float | None = Field(
        None,
        description="head_to_head: the primary interval's lower bound must exceed this; default 50 for the "
        "win rate (%), 0 for a score or accuracy difference.",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="head_to_head: two-sided confidence level.")
    bootstrap_resamples: int = Field(2000, ge=100, description="head_to_head: bootstrap resamples per interval.")
    seed: int = Field(0, description="head_to_head: seed of the bootstrap and of the judge's output order.")
    min_prompts: int = Field(
        10, ge=1, description="head_to_head: fewer judged prompts than this never promote (intervals are unreliable)."
    )
    min_mt_bench_delta: float = Field(0.0, description="threshold: challenger MT-Bench score >= champion's + this.")
    max_win_rate_drop: float = Field(
        1.0, ge=0.0, description="threshold: AlpacaEval win rate (points) may drop by at most this."
    )
    max_preference_accuracy_drop: float = Field(
        0.0, ge=0.0, description="threshold: held-out preference accuracy may drop by at most this."
    )
    require_metrics: bool = Field(
        False, description="Refuse promotion when a gated metric is missing on either side (either mode)."
    )
    first_version: Literal["beat_start_model", "promote"] = Field(
        "beat_start_model",
        description="With no champion yet: beat_start_model gates the version against the model it was trained "
        "from, by the same rules as against a champion (needs orchestration.evaluate_base_model: true, or "
        "`orpo gate --start-report DIR`; without that evaluation the version stays challenger); promote: the "
        "first version becomes champion without any comparison.",
    )

    @model_validator(mode="after")
    def _primary_is_gated(self) -> GateConfig:
        if self.primary_metric not in self.gated_metrics:
            raise ValueError(
                f"registry.gate.primary_metric {self.primary_metric!r} must be one of registry.gate.gated_metrics "
                f"({', '.join(self.gated_metrics)})"
            )
        return self


class RegistryConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db."
    )
    experiment_name: str = "orpo-pipeline"
    registered_model_name: str = "orpo-model"
    log_merged_model: bool = Field(False, description="For LoRA, also log the merged model.")
    gate: GateConfig = Field(default_factory=GateConfig)


class JudgeConfig(_Section):
    kind: Literal["hf", "openai"] = Field(
        "hf",
        description="hf: a local transformers model (numbers are logged under non-official names); openai: any "
        "OpenAI-compatible endpoint, judged with the official AlpacaEval 2.0 and MT-Bench protocols.",
    )
    model: str = Field(
        "builtin:smollm2-135m-instruct",
        description="The hf judge's model spec (hub id, directory, builtin:...). Endpoint judges take their model "
        "names from alpaca_annotator_model and mt_bench_judge_model.",
    )
    alpaca_annotator_model: str = Field(
        "gpt-4-1106-preview",
        description="Endpoint model that annotates AlpacaEval (the leaderboard's GPT-4 Turbo annotator).",
    )
    mt_bench_judge_model: str = Field(
        "gpt-4", description="Endpoint model that grades MT-Bench (FastChat's default judge)."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. https://api.openai.com/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    api_key_secret: str | None = Field(None, description="Prefect Secret block holding the API key (flows only).")
    max_concurrency: int = Field(4, gt=0, description="Judge requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0.0, description="Seconds one judge request may take before it is retried.")
    max_retries: int = Field(5, ge=0, description="Retries per item of 408/409/429/5xx, timeouts, bad bodies.")
    backoff_base_s: float = Field(1.0, gt=0.0, description="First retry waits up to this long (full jitter).")
    backoff_cap_s: float = Field(30.0, gt=0.0, description="Longest wait between retries (Retry-After may exceed).")
    max_failure_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Fail the evaluation when more than this share of judge items failed for good (recorded "
        "as $ERROR$ otherwise, like FastChat).",
    )
    down_after: int = Field(
        4, gt=0, description="Connection failures before any success after which the judge counts as down."
    )
    max_new_tokens: int = Field(
        512, gt=0, description="hf judge: tokens per judgment (endpoint judges use each protocol's own limit)."
    )
    cache_dir: str | None = Field(None, description="On-disk judgment cache (default: <workdir>/judge-cache).")


class EvalConfig(_Section):
    suites: list[Literal["alpaca", "mtbench", "diversity", "preference", "lm-eval"]] = Field(
        default_factory=lambda: ["alpaca", "mtbench", "diversity", "preference"]
    )
    alpaca_source: str | None = Field(
        None,
        description="AlpacaEval instructions + gpt4_1106_preview baseline outputs (a JSON file, or a hub dataset "
        "id); default: the official file at a pinned revision, downloaded once and cached.",
    )
    alpaca_evaluator: str = Field(
        "weighted_alpaca_eval_gpt4_turbo",
        description="alpaca_eval evaluator config (prompt, decoding, parser) read from the installed package.",
    )
    mt_bench_questions: str | None = Field(
        None,
        description="MT-Bench questions: FastChat question.jsonl or a hub dataset id; default: the official file "
        "at a pinned revision, downloaded once and cached.",
    )
    mt_bench_judge_prompts: str | None = Field(
        None,
        description="FastChat judge_prompts.jsonl; default: the official file (pinned, cached) for an openai "
        "judge, the project's short prompts ('builtin', never reported as MT-Bench) for an hf judge.",
    )
    mt_bench_reference_answers: str | None = Field(
        None,
        description="FastChat reference_answer/gpt-4.jsonl (GPT-4 answers for math/reasoning/coding); default: "
        "the official file (pinned, cached).",
    )
    data_cache_dir: str | None = Field(
        None, description="Where downloaded official evaluation data is kept (default: ~/.cache/orpo-pipeline)."
    )
    alpaca_limit: int | None = Field(None, gt=0, description="Evaluate a seeded subset of this many instructions.")
    mt_bench_limit: int | None = Field(None, gt=0, description="Evaluate a seeded subset of this many questions.")
    lc_glm_df_gamed: str | None = Field(
        None, description="Path to alpaca_eval's df_gamed.csv for the full length-controlled GLM."
    )
    max_new_tokens: int = Field(
        512, gt=0,
        description="Generation limit of AlpacaEval outputs (and of MT-Bench answers unless mt_bench_max_new_tokens "
        "is set).",
    )
    mt_bench_max_new_tokens: int | None = Field(
        None, gt=0,
        description="Generation limit of MT-Bench answers (default: max_new_tokens); MT-Bench numbers get the "
        "official mt_bench/ names only at FastChat's 1024.",
    )
    batch_size: int = Field(8, gt=0)
    seed: int = 0
    diversity_samples: int = Field(4, ge=2, description="Samples per prompt for per-input diversity.")
    diversity_prompts: int = Field(8, gt=0)
    diversity_temperature: float = Field(0.7, gt=0.0)
    preference_limit: int | None = Field(None, gt=0, description="Pairs of the test split for preference accuracy.")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness task names.")
    lm_eval_include_path: str | None = Field(None, description="Directory of local lm-eval task YAMLs.")
    lm_eval_limit: int | None = Field(None, gt=0)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


class OrchestrationConfig(_Section):
    cron: str = Field("0 2 * * *", description="Nightly schedule (cron, in `timezone`).")
    timezone: str = "UTC"
    start_from: Literal["base", "champion"] = Field(
        "base", description="Train from the base model or from the current champion."
    )
    launch_with_accelerate: bool = Field(
        True, description="Run training as an `accelerate launch` subprocess (false: in-process)."
    )
    evaluate_base_model: bool = Field(
        True, description="Also evaluate the model training started from (cached), for before/after numbers."
    )
    train_timeout_s: float | None = Field(None, gt=0, description="Fail the training task after this long.")
    tags: list[str] = Field(default_factory=lambda: ["orpo"])
    work_pool: str | None = Field(None, description="Prefect work pool for `prefect deploy` users.")


class AblationConfig(_Section):
    """`orpo ablate` / the `ablation-study` flow: SFT only vs ORPO (several lambdas) vs SFT+DPO, same data and steps."""

    study: str | None = Field(
        None, description="Study name, tagged on every arm's MLflow run and model version (default: the run name)."
    )
    orpo_lambdas: list[float] = Field(
        default_factory=lambda: [0.1, 0.25, 0.5],
        description="ORPO arms, one per lambda (> 0); the SFT arm is lambda 0 and always runs.",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [42], min_length=1,
        description="Train every arm once per seed (train.seed); two or more give a spread for the headline numbers.",
    )
    dpo: bool = Field(True, description="Run the SFT+DPO arm (needs `pip install 'orpo-pipeline[ablation]'`).")
    dpo_beta: float = Field(0.1, gt=0.0, description="DPO's beta (strength of the KL anchor to the SFT model).")
    dpo_learning_rate: float | None = Field(None, gt=0.0, description="DPO phase learning rate (default: train's).")
    dpo_max_steps: int | None = Field(
        None, gt=0, description="DPO phase steps after SFT (default: train.max_steps, the same budget as each arm)."
    )
    probe_pairs: int | None = Field(
        64, gt=0, description="Held-out pairs scored at every train.eval_steps for the time-to-accuracy curves.",
    )
    target_accuracy: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Held-out preference accuracy both ORPO and SFT+DPO are timed to (default: the lower of the "
        "two arms' best, so both reach it).",
    )
    registered_model_name: str | None = Field(
        None, description="Registered model the arms become versions of (default: <registry.registered_model_name>"
        "-ablation, so a study never moves the production model's aliases).",
    )
    arm_timeout_s: float | None = Field(None, gt=0, description="Stop an arm's training subprocess after this long.")

    @field_validator("orpo_lambdas")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError("ORPO lambdas must be > 0 (lambda 0 is the SFT arm, which always runs)")
        return value


class PipelineConfig(_Section):
    """The whole pipeline. Also the Prefect flow's parameter model (the UI renders it as a form)."""

    run_name: str | None = Field(None, description="Default: <model>-<UTC date and time>.")
    workdir: str = Field("runs", description="Where datasets, checkpoints, reports and the MLflow store live.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)

    @model_validator(mode="after")
    def _incremental_needs_champion(self) -> PipelineConfig:
        if self.data.incremental and self.orchestration.start_from != "champion":
            raise ValueError(
                "data.incremental: true trains only on shards the champion has not seen, so it needs "
                "orchestration.start_from: champion (or set data.incremental: false to train on all shards)"
            )
        return self

    @field_validator("workdir")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("workdir must be a directory path, e.g. runs")
        return value

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI this pipeline writes to."""
        import os

        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.workdir).resolve() / 'mlflow.db'}"

    def config_hash(self) -> str:
        """A short, stable hash of everything that defines the run (not where it writes)."""
        # The ablation section chooses which runs to make, not what one run does.
        payload = self.model_dump(mode="json", exclude={"run_name", "workdir", "ablation"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(UsageError, ValueError):
    """A configuration that cannot run; the message says which key and what to do."""


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; check the spelling (see `orpo config show` for all keys)")
            continue
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {item['msg']}{got_text}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lora.r=8` -> (["train", "lora", "r"], 8). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.learning_rate=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    # YAML reads 5e-6 as a string (it wants 5.0e-6); numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = json.loads(json.dumps(raw))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (data:, model:, train:, ...)")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, overrides)
        origin += " + overrides"
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def validate_config(data: dict[str, Any] | PipelineConfig, origin: str = "parameters") -> PipelineConfig:
    """Validate a config given as data (e.g. Prefect parameters) with the same messages as load_config."""
    if isinstance(data, PipelineConfig):
        return data
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def dump_config(config: PipelineConfig, path: str | Path) -> Path:
    """Write the fully resolved config (every default spelled out) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path


def flatten(config: PipelineConfig) -> dict[str, str]:
    """Dotted key -> value string, for MLflow params and tables."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", config.model_dump(mode="json"))
    return out
