"""The arms of an ablation study and the config each one trains with.

Every arm trains from the same base model on the same prepared dataset with the same seed, step budget,
batch, learning rate, LoRA settings and lengths; only the objective differs:

- `sft`: the ORPO trainer with lambda = 0 (NLL on the chosen responses only);
- `orpo-<lambda>`: the ORPO trainer at each configured lambda;
- `sft-dpo`: TRL's DPOTrainer starting from the `sft` arm's model, with a frozen copy of that model as the
  reference; its cost is the SFT phase plus the DPO phase.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from orpo.config import ConfigError, PipelineConfig

KIND_ORPO = "orpo"  # our trainer; lambda 0 is SFT
KIND_DPO = "dpo"  # TRL's DPOTrainer on top of the SFT arm

INSTALL_HINT = "pip install 'orpo-pipeline[ablation]'"


@dataclass(frozen=True)
class Arm:
    """One trained model of the study."""

    name: str  # sft, orpo-0.1, sft-dpo
    kind: str  # KIND_ORPO or KIND_DPO
    orpo_lambda: float  # 0 for sft and for the SFT phase of sft-dpo
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.name}-seed{self.seed}"

    @property
    def method(self) -> str:
        if self.kind == KIND_DPO:
            return "sft+dpo"
        return "sft" if self.orpo_lambda == 0 else "orpo"


def lambda_name(value: float) -> str:
    return "sft" if value == 0 else f"orpo-{value:g}"


def plan_arms(config: PipelineConfig) -> list[Arm]:
    """Every arm for every seed, headline arms first: SFT, the first ORPO lambda and SFT+DPO for each seed, then
    the other lambdas. A study stopped early still has every seed of the headline comparison.

    A seed's SFT arm always comes before its SFT+DPO arm (DPO starts from it).
    """
    study = config.ablation
    lambdas = [float(lam) for lam in study.orpo_lambdas]
    seeds = study.seeds
    arms = [Arm("sft", KIND_ORPO, 0.0, seed) for seed in seeds]
    arms += [Arm(lambda_name(lam), KIND_ORPO, lam, seed) for lam in lambdas[:1] for seed in seeds]
    if study.dpo:
        arms += [Arm("sft-dpo", KIND_DPO, 0.0, seed) for seed in seeds]
    arms += [Arm(lambda_name(lam), KIND_ORPO, lam, seed) for lam in lambdas[1:] for seed in seeds]
    return arms


def arm_config(config: PipelineConfig, arm: Arm) -> PipelineConfig:
    """The study's config with this arm's lambda and seed; everything else stays the same for every arm."""
    train = config.train.model_copy(update={"orpo_lambda": arm.orpo_lambda, "seed": arm.seed, "output_dir": None})
    registry = config.registry.model_copy(update={"registered_model_name": study_model_name(config)})
    return config.model_copy(update={"train": train, "registry": registry, "run_name": arm.run_name})


def study_model_name(config: PipelineConfig) -> str:
    """The registered model whose versions are the study's arms."""
    return config.ablation.registered_model_name or f"{config.registry.registered_model_name}-ablation"


def quick_config(config: PipelineConfig) -> PipelineConfig:
    """`--quick`: one seed, the first ORPO lambda, a few steps, preference + diversity on a handful of inputs.

    Sized to finish in under 15 minutes on a 2-core CPU with SmolLM2-135M and LoRA.
    """
    from orpo.config import validate_config

    raw = config.model_dump(mode="json")
    train = raw["train"]
    train["max_steps"] = min(train.get("max_steps") or 12, 12)
    train["eval_steps"] = 4
    train["save_steps"] = None
    train["max_length"] = min(train["max_length"], 192)
    train["max_prompt_length"] = min(train["max_prompt_length"], 96)
    ablation = raw["ablation"]
    ablation["seeds"] = ablation["seeds"][:1]
    ablation["orpo_lambdas"] = ablation["orpo_lambdas"][:1]
    ablation["probe_pairs"] = min(ablation.get("probe_pairs") or 16, 16)
    ablation["dpo_max_steps"] = min(ablation.get("dpo_max_steps") or train["max_steps"], train["max_steps"])
    ev = raw["eval"]
    ev["suites"] = [s for s in ev["suites"] if s in ("preference", "diversity")] or ["preference"]
    ev["preference_limit"] = min(ev.get("preference_limit") or 16, 16)
    ev["diversity_prompts"] = min(ev["diversity_prompts"], 3)
    ev["diversity_samples"] = min(ev["diversity_samples"], 3)
    ev["max_new_tokens"] = min(ev["max_new_tokens"], 32)
    return validate_config(raw, origin="--quick settings")


def require_trl() -> None:
    """The SFT+DPO arm needs TRL; say how to install it before any arm starts."""
    if importlib.util.find_spec("trl") is None:
        raise ConfigError(
            f"the SFT+DPO arm needs TRL's DPOTrainer, which is not installed: run `{INSTALL_HINT}`, "
            "or set ablation.dpo=false to run the other arms only"
        )


def check_study(config: PipelineConfig) -> None:
    """Refuse a study that cannot produce its report, before anything trains."""
    if config.ablation.dpo:
        require_trl()
    if not config.train.eval_steps:
        raise ConfigError(
            "train.eval_steps is not set: the ablation's curves (log-probabilities and held-out accuracy over "
            "training) come from the periodic evaluation; set it, e.g. train.eval_steps=10"
        )
    if config.data.test_size <= 0:
        raise ConfigError("data.test_size must be > 0: the held-out curves need a test split")
