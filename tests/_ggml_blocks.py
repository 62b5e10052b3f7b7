"""Hand-written decoders of ggml's block formats, from the published block layouts (little-endian).

They are the tests' independent reference for GGUF dequantization: the loader itself uses the `gguf`
package, so comparing the loader with the package alone would compare the code with itself.
Each function takes the raw bytes of one row, (n_blocks * block_bytes,) uint8, and returns float32 values.
"""

import numpy as np


def _f16(raw, start):
    return raw[..., start : start + 2].copy().view(np.float16).astype(np.float32)[..., 0]


def q8_0(row):
    """Blocks of 34 bytes: fp16 d, 32 int8 q; w = d * q."""
    b = row.reshape(-1, 34)
    return (_f16(b, 0)[:, None] * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)


def _nibbles(qs):
    """16 bytes -> 32 values: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.float32)


def q4_0(row):
    """Blocks of 18 bytes: fp16 d, 16 bytes of nibbles; w = d * (q - 8)."""
    b = row.reshape(-1, 18)
    return (_f16(b, 0)[:, None] * (_nibbles(b[:, 2:]) - 8)).reshape(-1)


def q4_1(row):
    """Blocks of 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m."""
    b = row.reshape(-1, 20)
    return (_f16(b, 0)[:, None] * _nibbles(b[:, 4:]) + _f16(b, 2)[:, None]).reshape(-1)


def q5_0(row):
    """Blocks of 22 bytes: fp16 d, 32 high bits (uint32), 16 bytes of nibbles; w = d * ((q | hi << 4) - 16)."""
    b = row.reshape(-1, 22)
    high = b[:, 2:6].copy().view("<u4")[:, 0]
    bits = ((high[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float32)
    return (_f16(b, 0)[:, None] * (_nibbles(b[:, 6:]) + 16 * bits - 16)).reshape(-1)


def _k4_scales(s):
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    s = s.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def q4_k(row):
    """Super-blocks of 144 bytes (256 weights): fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes
    of nibbles; each 32-byte chunk holds two sub-blocks (low nibbles first); w = d*sc*q - dmin*m."""
    b = row.reshape(-1, 144)
    d, dmin = _f16(b, 0)[:, None], _f16(b, 2)[:, None]
    sc, mn = _k4_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)  # sub-block order
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(-1)


def q6_k(row):
    """Super-blocks of 210 bytes (256 weights): 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales,
    fp16 d; w = d * scale * (q - 32), one scale per 16 weights."""
    b = row.reshape(-1, 210)
    d = _f16(b, 208)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    out = np.empty((b.shape[0], 256), np.float32)
    for half in range(2):
        ql, qh = b[:, 64 * half : 64 * half + 64].astype(np.int32), b[:, 128 + 32 * half : 160 + 32 * half].astype(np.int32)
        parts = [(ql[:, :32] & 0xF) | ((qh & 3) << 4), (ql[:, 32:] & 0xF) | (((qh >> 2) & 3) << 4),
                 (ql[:, :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[:, 32:] >> 4) | (((qh >> 6) & 3) << 4)]
        for k, q in enumerate(parts):
            sc = np.repeat(scales[:, 8 * half + 2 * k : 8 * half + 2 * k + 2], 16, axis=1)
            out[:, 128 * half + 32 * k : 128 * half + 32 * k + 32] = d[:, None] * sc * (q - 32)
    return out.reshape(-1)


DECODERS = {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q4_K": q4_k, "Q6_K": q6_k}
