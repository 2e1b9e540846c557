"""Optimizer, LR-schedule and RNG state as safetensors + JSON, so resuming never unpickles anything.

torch and Accelerate save these with torch.save (pickle); we flatten the tensors into a safetensors
file and keep the small non-tensor rest in JSON.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .io import save_tensors, write_json


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    save_tensors(directory / "optimizer.safetensors", tensors)
    write_json(directory / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in list(load_file(str(directory / "optimizer.safetensors")).items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]),
                                                                    int(np_state[3]), float(np_state[4])]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
