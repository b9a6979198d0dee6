"""bitsandbytes 4-bit weights in the kernels: the jit helper that dequantizes a tile of W in
registers (a kernel calls it behind a ``QUANT4`` constexpr, on a ``descriptors.Quant4``).

The packed format (bitsandbytes 0.50, NF4 and FP4): W ``[N, K]`` is flattened row-major;
element ``f = n * K + k`` is the 4-bit code in byte ``f // 2`` of the packed data, the high
nibble for even f, the low nibble for odd f (with N * K odd the last low nibble is padding).
Blocks of ``blocksize`` consecutive flat elements share one scale ``absmax[f // blocksize]``
(fp32), so when K is not a multiple of the blocksize a block straddles two rows. The value
is ``code_book[code] * absmax`` in fp32 (the code books: ``fastlora.ops.quant4.code_book``);
bitsandbytes' forward rounds it once, straight to the compute dtype. Double quantization
("nested") stores absmax as uint8 codes q: ``absmax[b] = code2[q[b]] * absmax2[b // blocksize2]
+ offset`` in fp32 (code2: the 256-entry dynamic map, blocksize2 256 as bitsandbytes writes it;
offset a 1-element tensor).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, live,
                  Q4_BLOCKSIZE2: tl.constexpr):
    """fp32 scales of the quant blocks ``blocks`` (int64 vector), 0 where not ``live``."""
    if Q4_BLOCKSIZE2 > 0:
        q = tl.load(absmax_ptr + blocks, mask=live, other=0).to(tl.int32)
        outer = tl.load(absmax2_ptr + blocks // Q4_BLOCKSIZE2, mask=live, other=0.0)
        scale = tl.load(code2_ptr + q) * outer + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=live, other=0.0)
    return tl.where(live, scale, 0.0)


@triton.jit
def _pick_scales(scale, first, end, slot_even, slot_odd, n_in, q4_absmax, q4_absmax2, q4_code2,
                 q4_offset, SLOTS: tl.constexpr, Q4_BLOCKSIZE: tl.constexpr,
                 Q4_BLOCKSIZE2: tl.constexpr):
    """Per element of the even and odd halves, the scale of block ``first + slot`` of its row
    (slots int32, < SLOTS); ``scale`` holds slot 0's, ``end`` bounds the row's elements."""
    scale_even = scale
    scale_odd = scale
    for j in tl.static_range(1, SLOTS):
        live = n_in & ((first + j) * Q4_BLOCKSIZE < end)
        scale_j = _block_scales(q4_absmax, q4_absmax2, q4_code2, q4_offset, first + j, live,
                                Q4_BLOCKSIZE2)[:, None]
        scale_even = tl.where(slot_even == j, scale_j, scale_even)
        scale_odd = tl.where(slot_odd == j, scale_j, scale_odd)
    return scale_even, scale_odd


@triton.jit
def dequant4_tile(q4_data, q4_absmax, q4_code, q4_absmax2, q4_code2, q4_offset,
                  ns, n_in, k0, K, TRANSPOSE: tl.constexpr, DTYPE: tl.constexpr,
                  BLOCK_K: tl.constexpr, Q4_BLOCKSIZE: tl.constexpr,
                  Q4_BLOCKSIZE2: tl.constexpr, Q4_ALIGNED: tl.constexpr):
    """W's rows ``ns`` (int64 vector, ``n_in`` its mask) and columns ``k0 .. k0 + BLOCK_K``
    (k0 a multiple of BLOCK_K) in DTYPE, zero outside W: ``[len(ns), BLOCK_K]`` (W itself:
    the dx pass, row norms) or, with TRANSPOSE, ``[BLOCK_K, len(ns)]`` (the forward's
    ``b = W^T``). Values are computed in fp32 and rounded once, as bitsandbytes' forward.

    The even and odd columns are decoded as two ``[len(ns), BLOCK_K / 2]`` halves from
    bytes loaded contiguously along k, then interleaved. A row's elements are the flat
    ``start .. start + BLOCK_K`` (start = n K + k0): the scales of the few quant blocks
    they meet are loaded once per row, and each element picks its own. With Q4_ALIGNED
    (K a multiple of the blocksize, as in real layers) rows start on a byte and on a block,
    so byte j holds columns 2j, 2j + 1 of one block. Otherwise (odd shapes) a row may start
    on a low nibble (columns 2j, 2j + 1 then sit in bytes j and j + 1) and a block boundary
    may fall anywhere in the row.
    """
    jj = tl.arange(0, BLOCK_K // 2)
    start = ns * K + k0
    end = start + tl.minimum(K - k0, BLOCK_K)
    first = start // Q4_BLOCKSIZE
    # column 2j is inside W when j < ceil((K - k0) / 2), column 2j + 1 when j < (K - k0) // 2
    # (one bound when aligned, K even: a bound the compiler sees divisible keeps the byte
    # loads vectorized)
    odd_in = n_in[:, None] & (jj < (K - k0) // 2)[None, :]
    even_in = odd_in if Q4_ALIGNED else n_in[:, None] & (jj < (K - k0 + 1) // 2)[None, :]
    byte_ptrs = q4_data + (start // 2)[:, None] + jj[None, :]
    byte = tl.load(byte_ptrs, mask=even_in, other=0).to(tl.int32)
    scale = _block_scales(q4_absmax, q4_absmax2, q4_code2, q4_offset, first, n_in,
                          Q4_BLOCKSIZE2)[:, None]
    if Q4_ALIGNED:
        code_even = byte >> 4
        code_odd = byte & 15
        # a row of the tile lies in one block, or covers BLOCK_K // blocksize whole blocks
        slots: tl.constexpr = BLOCK_K // Q4_BLOCKSIZE if BLOCK_K > Q4_BLOCKSIZE else 1
        slot_even = (2 * jj // Q4_BLOCKSIZE)[None, :]
        slot_odd = slot_even
    else:
        low_first = (start % 2 == 1)[:, None]  # the row starts on a low nibble
        after = tl.load(byte_ptrs + 1, mask=odd_in & low_first, other=0).to(tl.int32)
        code_even = tl.where(low_first, byte & 15, byte >> 4)
        code_odd = tl.where(low_first, after >> 4, byte & 15)
        # a row meets at most (BLOCK_K - 1) // blocksize + 2 blocks
        slots: tl.constexpr = (BLOCK_K - 1) // Q4_BLOCKSIZE + 2
        in_block = (start % Q4_BLOCKSIZE).to(tl.int32)[:, None] + 2 * jj[None, :]
        slot_even = in_block // Q4_BLOCKSIZE
        slot_odd = (in_block + 1) // Q4_BLOCKSIZE
    scale_even, scale_odd = _pick_scales(scale, first, end, slot_even, slot_odd, n_in, q4_absmax,
                                         q4_absmax2, q4_code2, q4_offset, slots, Q4_BLOCKSIZE,
                                         Q4_BLOCKSIZE2)
    # the code book is read once per tile and tl.gather looks codes up on chip; a global
    # load per element got pipelined through shared memory (+11 to 14 KB in AOT builds)
    book = tl.broadcast_to(tl.load(q4_code + tl.arange(0, 16))[None, :], (ns.shape[0], 16))
    even = tl.where(even_in, tl.gather(book, code_even, 1) * scale_even, 0.0).to(DTYPE)
    odd = tl.where(odd_in, tl.gather(book, code_odd, 1) * scale_odd, 0.0).to(DTYPE)
    w = tl.reshape(tl.join(even, odd), (ns.shape[0], BLOCK_K))
    if TRANSPOSE:
        w = tl.trans(w)
    return w
