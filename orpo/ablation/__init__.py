"""An ablation study users run before committing to ORPO: SFT only vs ORPO (several lambdas) vs SFT+DPO.

Plain functions, no Prefect (the `ablation-study` flow in flows/ablation.py composes them):
- `arms`: which arms, and the config each trains with (same data, seed, steps; only the objective differs);
- `train_arm`: one arm in its own process (our ORPO trainer, or the DPO phase), timed, its peak memory read;
- `dpo`: the DPO phase with TRL's DPOTrainer, exported in the layout the registry reads;
- `timeline`: held-out preference accuracy against training seconds;
- `report`: the report's math, figures and Markdown; `tracking`: study tags and the report in MLflow.
"""
