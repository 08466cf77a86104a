"""Parallelism plans applied to a plain model from outside (training and inference use the same ones): `tensor.py`,
tensor parallelism with DTensor. Data parallelism (DDP, FSDP2) is applied by `lmforge.train.distributed`."""

from .tensor import check_tensor_parallel, tensor_parallel

__all__ = ["check_tensor_parallel", "tensor_parallel"]
