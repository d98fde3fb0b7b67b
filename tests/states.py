"""Helpers shared by the test modules (pytest puts this folder on `sys.path`)."""

import torch


def same(a, b) -> bool:
    "Exact equality of nested states: tensors (dtype and values), dicts (keys), lists/tuples, plain values."
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b
