"""Counter-based random bits: a pure function of (seed, stream, row, column).

Value tables draw the stochastic rounding of bf16 row updates from here, so the bits never
depend on how a table is sharded, in which order rows are visited or whether a run was
resumed: row r of a shard gets the bits of row r of the whole table. The
mixer is a 32-bit integer hash (lowbias32's xor-shift-multiply shape, multipliers below 2^31)
computed on int64 tensors: products stay below 2^63, so ``(x * M) & MASK`` is exactly the
wrapping uint32 product a GPU kernel would compute. Vectorised torch ops, any device.
"""

from __future__ import annotations

import torch

MASK = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x2C1B3C6D
_GOLDEN = 0x9E3779B9  # column stride of the element counter
ROUND_STREAM = 1  # one stream per use, should another use come


def mix32(x):
    """A bijective 32-bit hash of ``x`` in [0, 2^32) (an int, or an int64 tensor, in place)."""
    if isinstance(x, torch.Tensor):
        x ^= x >> 16
        x.mul_(_M1).bitwise_and_(MASK)
        x ^= x >> 15
        x.mul_(_M2).bitwise_and_(MASK)
        x ^= x >> 16
        return x
    x ^= x >> 16
    x = (x * _M1) & MASK
    x ^= x >> 15
    x = (x * _M2) & MASK
    return x ^ (x >> 16)


def row_keys(seed: int, stream: int, counter: int, rows: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per global row id of ``rows`` [R] (int64), for ``(seed, stream, counter)``
    (``counter``: the optimizer step for rounding, 0 for the init)."""
    base = mix32(mix32(mix32(seed & MASK) ^ stream) ^ (counter & MASK))
    keys = rows.to(torch.int64) >> 32
    keys ^= base
    mix32(keys)
    keys ^= rows & MASK
    return mix32(keys)


def element_bits(keys: torch.Tensor, col_start: int, n_cols: int) -> torch.Tensor:
    """32 random bits [R, n_cols] (int64) for columns ``col_start ...`` of the rows keyed by
    ``keys`` [R]: two hash rounds of ``key + column * golden``."""
    cols = torch.arange(col_start, col_start + n_cols, device=keys.device, dtype=torch.int64)
    bits = cols.mul_(_GOLDEN).add(keys.unsqueeze(1)).bitwise_and_(MASK)
    mix32(bits)
    bits ^= keys.unsqueeze(1)
    return mix32(bits)


def stochastic_round_bf16(x: torch.Tensor, keys: torch.Tensor, col_start: int) -> torch.Tensor:
    """fp32 ``x`` [R, d] (overwritten) rounded to bf16 up or down with probability given by its
    distance to each, so the rounding is unbiased: 16 random bits are added to the bits bf16
    drops, then those bits are truncated."""
    noise = element_bits(keys, col_start, x.shape[1]).bitwise_and_(0xFFFF).to(torch.int32)
    bits = x.view(torch.int32)
    bits.add_(noise).bitwise_and_(-0x10000)  # sign-magnitude: rounds the magnitude
    return x.to(torch.bfloat16)  # exact: the low 16 bits are zero

