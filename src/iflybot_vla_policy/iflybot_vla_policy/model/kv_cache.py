"""Key/value caches of the decoder: the per-layer list the prefix pass returns (KV) and the
preallocated static buffers the latent tokens are decoded into (no reallocation, static shapes
for graph capture)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, kv_heads, S, head_dim) each


@dataclass
class StaticKV:
    """Preallocated per-layer key/value buffers (B, kv_heads, capacity, head_dim): the prefix
    is written once, each decoded token into its own fixed slot."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @classmethod
    def allocate(cls, kv: KV, extra: int) -> StaticKV:
        """Buffers for the prefix `kv` plus `extra` slots, zeroed (a masked slot must hold a
        finite value: attention weights of 0 times NaN would still be NaN)."""
        keys, values = [], []
        for k, v in kv:
            b, h, s, d = k.shape
            kb, vb = k.new_zeros(b, h, s + extra, d), v.new_zeros(b, h, s + extra, d)
            kb[:, :, :s] = k
            vb[:, :, :s] = v
            keys.append(kb)
            values.append(vb)
        return cls(keys, values)

    def views(self, length: int) -> KV:
        return [(k[:, :, :length], v[:, :, :length])
                for k, v in zip(self.keys, self.values, strict=True)]
