"""A pre-allocated key/value cache whose rollback is free.

Kangaroo's layers see different numbers of tokens inside one round: the shallow layers ``[0, ℓ)`` and
the adapter run ahead on drafted tokens while the deep layers ``[ℓ, L)`` only catch up at verification.
So every layer keeps its own length, and rolling back a rejected draft is just lowering that length:
the stale slots are overwritten by the next write (the gpt-fast static-cache idea).

The class speaks the one method HF attention modules call on a cache,
``update(key_states, value_states, layer_idx, ...) -> (keys, values)``, so HF's own attention
modules write into it unchanged.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value buffers of shape ``[B, H_kv, capacity, D]``.

    Args:
        num_layers: number of attention layers this cache serves (layer_idx in ``[0, num_layers)``).
        capacity: initial number of positions; buffers double when a write would overflow.
    """

    def __init__(self, num_layers: int, capacity: int = 256) -> None:
        self.num_layers = num_layers
        self.capacity = max(1, capacity)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths: list[int] = [0] * num_layers
        # a token tree's keys/values per layer, ``[B, H_kv, rows, D]``, while its round is verified
        # (kangaroo.tree): the accepted path is copied back from here when a later branch overwrote it
        self.stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stash_blocks: list[tuple[range, torch.Tensor]] = []  # new_stashes' layers and their [2, n, H_kv, rows, D]
        # the buffers as the fused attention takes them, ``[H_kv, capacity, D]`` (batch 1; float32 or
        # bfloat16), with their capacity (0: none) and dtype in flat lists: a 30-layer step reserves
        # its slots with list slices (~5 us, where a call per layer took ~22 us of a ~4 ms step)
        self._flat_k: list[torch.Tensor | None] = [None] * num_layers
        self._flat_v: list[torch.Tensor | None] = [None] * num_layers
        self._flat_cap: list[int] = [0] * num_layers
        self._flat_dtype: list[torch.dtype | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``[B, H_kv, T, D]`` keys/values at the layer's current length; return all of them.

        Returns:
            ``(keys, values)``, each ``[B, H_kv, length + T, D]`` (views into the buffers).
        """
        start, T = self.lengths[layer_idx], key_states.shape[-2]
        end = start + T
        buf_k = self.keys[layer_idx]
        if buf_k is None or end > buf_k.shape[-2] or buf_k.dtype != key_states.dtype:
            self._grow(layer_idx, key_states, value_states, end)
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def slots(self, layer_idx: int, T: int, heads: int, dim: int, like: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Reserve ``T`` positions after the layer's length, for a caller that writes them itself
        (the engine's fused attention): returns ``(keys, values, start)``, the layer's whole buffers
        ``[H_kv, capacity, D]`` (batch 1, in ``dtype``: float32, or bfloat16 for half the bytes to
        read) and the first reserved position."""
        start, end = self.lengths[layer_idx], self.lengths[layer_idx] + T
        if end > self._flat_cap[layer_idx] or self._flat_dtype[layer_idx] is not dtype:
            if dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"the fused attention's cache holds float32 or bfloat16, not {dtype}")
            template = torch.empty(1, heads, 0, dim, dtype=dtype, device=like.device)
            self._grow(layer_idx, template, template, end)
        self.lengths[layer_idx] = end
        return self._flat_k[layer_idx], self._flat_v[layer_idx], start

    def slots_range(self, layers: range, T: int, shapes: list[tuple[int, int]], like: torch.Tensor,
                    dtype: torch.dtype = torch.float32):
        """:meth:`slots` for ``layers`` at once (``shapes[i]`` = layer ``i``'s ``(H_kv, D)``): lists of
        their key buffers, value buffers and first reserved positions."""
        a, b = layers.start, layers.stop
        starts = self.lengths[a:b]
        if layers.step == 1 and all(s + T <= c for s, c in zip(starts, self._flat_cap[a:b])) \
                and all(d is dtype for d in self._flat_dtype[a:b]):  # every layer has room: no call per layer
            self.lengths[a:b] = [s + T for s in starts]
            return self._flat_k[a:b], self._flat_v[a:b], starts
        reserved = [self.slots(i, T, *shapes[i], like, dtype) for i in layers]
        return [r[0] for r in reserved], [r[1] for r in reserved], [r[2] for r in reserved]

    def new_stash(self, layer_idx: int, heads: int, dim: int, T: int, device,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh key and value stashes ``[H_kv, T, D]`` (in the cache's ``dtype``) for a token tree's rows
        in ``layer_idx``, kept in :attr:`stash` (batch 1) for :meth:`commit`."""
        stash = torch.empty(2, heads, T, dim, device=device, dtype=dtype)
        self.stash[layer_idx] = (stash[0][None], stash[1][None])
        return stash[0], stash[1]

    def new_stashes(self, layers: range, shapes: list[tuple[int, int]], T: int, device,
                    dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`new_stash` for ``layers`` at once (``shapes[i]`` = layer ``i``'s ``(H_kv, D)``): lists of
        their key and value stashes. Layers of one shape share one allocation (thirty allocations and
        their views cost ~0.25 ms of a ~5 ms tree step)."""
        if len({shapes[i] for i in layers}) != 1:
            pairs = [self.new_stash(i, *shapes[i], T, device, dtype) for i in layers]
            return [k for k, _ in pairs], [v for _, v in pairs]
        block = torch.empty(2, len(layers), shapes[layers.start][0], T, shapes[layers.start][1], device=device, dtype=dtype)
        self._stash_blocks.append((layers, block))
        return list(block[0].unbind(0)), list(block[1].unbind(0))

    def stashed(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's stash ``([B, H_kv, rows, D], same)``, from :meth:`new_stash` or :meth:`new_stashes`."""
        if layer_idx in self.stash:
            return self.stash[layer_idx]
        for layers, block in reversed(self._stash_blocks):  # the latest call's, as the dict keeps
            if layer_idx in layers:
                j = layer_idx - layers.start
                return block[0, j][None], block[1, j][None]
        raise KeyError(f"layer {layer_idx} has no stash")

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, start: int):
        """Write ``[B, H_kv, T, D]`` at positions ``start..start+T-1`` (at most the current length) and
        make that the layer's end; return all keys/values up to it, as :meth:`update` does."""
        if start > self.lengths[layer_idx]:
            raise ValueError(f"layer {layer_idx}: write at {start} leaves a gap after {self.lengths[layer_idx]}")
        self.lengths[layer_idx] = start
        return self.update(key_states, value_states, layer_idx)

    def commit(self, layers: range, pos: int, path: list[int], resident: bool) -> None:
        """Keep a tree's accepted rows ``path`` (one per depth) at ``pos + 1 ..`` in ``layers``: copied
        from :attr:`stash` unless already ``resident`` there; the layers then end after the path."""
        end = pos + 1 + len(path)
        for i in layers:
            if path and not resident:
                k, v = self.stashed(i)
                idx = torch.tensor(path, device=k.device)
                self.keys[i][:, :, pos + 1:end] = k[:, :, idx]
                self.values[i][:, :, pos + 1:end] = v[:, :, idx]
            self.lengths[i] = end
        self.stash.clear()
        self._stash_blocks.clear()

    def _grow(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        """(Re)allocate one layer's buffers with room for at least ``needed`` positions."""
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        self.capacity = capacity
        B, H, _, D = key_states.shape
        new_k = key_states.new_zeros(B, H, capacity, D)
        new_v = value_states.new_zeros(B, H, capacity, value_states.shape[-1])
        old_len = self.lengths[layer_idx]
        if self.keys[layer_idx] is not None and old_len:
            new_k[:, :, :old_len] = self.keys[layer_idx][:, :, :old_len]
            new_v[:, :, :old_len] = self.values[layer_idx][:, :, :old_len]
        self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
        flat = B == 1 and new_k.dtype in (torch.float32, torch.bfloat16)
        self._flat_k[layer_idx], self._flat_v[layer_idx] = (new_k[0], new_v[0]) if flat else (None, None)
        self._flat_cap[layer_idx], self._flat_dtype[layer_idx] = (capacity, new_k.dtype) if flat else (0, None)

    def length(self, layer_idx: int = 0) -> int:
        """Number of positions stored for ``layer_idx``."""
        return self.lengths[layer_idx]

    def crop(self, length: int, layers: range | None = None) -> None:
        """Roll back ``layers`` (default: all) to at most ``length`` positions. Costs nothing."""
        for i in layers if layers is not None else range(self.num_layers):
            self.lengths[i] = min(self.lengths[i], length)

    def reset(self) -> None:
        """Forget every position but keep the buffers for the next sequence."""
        self.lengths = [0] * self.num_layers
