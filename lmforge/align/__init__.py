"""Post-training: supervised fine-tuning (full or LoRA), and — as they land — preferences, reward models, PPO,
DPO, GRPO and Constitutional AI. Each method is a loss and a batch format plugged into `lmforge.train.loop`.

    lmforge sft --config configs/sft/arith.yaml base=runs/arith-base
"""
