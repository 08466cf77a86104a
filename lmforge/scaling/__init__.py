"""Scaling laws and planning: how big a model and how many tokens for a budget, how long it takes and what it
costs, whether it fits in memory for training and serving (`plan.py`, `estimate.py`), and what loss a bigger
run will reach, fitted from a user's own small runs (`laws.py`, `fit.py`, `sweep.py`).

    lmforge plan --compute 1e20
    lmforge scaling fit runs.csv --method chinchilla
    lmforge scaling sweep --config configs/scaling/cpu.yaml
"""
