"""Launch parameters: the block size and warps chosen from the vocabulary and element
size, and the Triton accumulate dtype of a torch output dtype.

A plain heuristic, not yet tuned on a GPU: each program streams one row in blocks of at
most 16 KiB of logits, enough bytes in flight per warp to keep a row's loads overlapped,
few enough registers that the fp32 working copy does not spill (``lenalign codegen``
shows the registers and spills; ``benchmarks/tune.py`` measures every alternative on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_BYTES = 16 * 1024


def vocab_block(vocab: int, element_size: int) -> tuple[int, int]:
    """Return (BLOCK_V, num_warps) for streaming rows of ``vocab`` elements."""
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_BYTES // element_size)
    if block <= 512:
        return block, 2
    if block <= 2048:
        return block, 4
    if block <= 4096:
        return block, 8
    return block, 16


def triton_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton accumulate dtype matching a torch float32 or float64 output."""
    return tl.float64 if dtype == torch.float64 else tl.float32
