"""The continuation both issue-12 probes train (scripts/adapter_variants.py):
150 steps from the shipped adapter on the stage-2 data (runs/task-prompts + runs/task-distill,
written by runs/task-train.sh), same seed and schedule, validation at the end."""
from kangaroo.training.config import TrainConfig


def continuation_config(out: str) -> TrainConfig:
    return TrainConfig(model="smollm2-135m-instruct", data=["runs/task-prompts"], out=out, seed=0,
                       val_size=240, self_distill=True, distill_cache="runs/task-distill", distill_max_new_tokens=160,
                       distill_max_prompt_tokens=1024, distill_batch=32, precision="bf16", threads=2, exit_layer=2,
                       init="src/kangaroo/adapters/smollm2-135m-instruct", max_steps=150, seq_len=1200,
                       batch_tokens=4096, lr=1e-3, warmup_steps=10, val_every=150, save_every=150, progress=False,
                       draft_vocab=0)
