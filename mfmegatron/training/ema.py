"""Exponential moving average of the student's weights (this rank's shards, in float32)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch


class ParameterEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = module
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.module.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """The module with the EMA weights in place (restored afterwards)."""
        saved = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                param.copy_(self.shadow[name])
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for name, param in self.module.named_parameters():
                    param.copy_(saved[name])

    def sharded_state_dict(self, module_sharded_state_dict: dict, key_prefix: str) -> dict:
        """The module's sharded layout with the EMA tensors as data and ``key_prefix`` keys.

        ``module_sharded_state_dict`` maps parameter names to megatron ShardedTensors (the
        module's own ``sharded_state_dict()``); non-parameter entries are left out.
        """
        sharded = {}
        for name, entry in module_sharded_state_dict.items():
            if name in self.shadow and hasattr(entry, "key"):
                sharded[name] = dataclasses.replace(
                    entry, key=key_prefix + entry.key, data=self.shadow[name], dtype=torch.float32
                )
        return sharded

    def load_state_dict(self, loaded: dict) -> None:
        for name, tensor in loaded.items():
            if name in self.shadow:
                self.shadow[name].copy_(tensor)
