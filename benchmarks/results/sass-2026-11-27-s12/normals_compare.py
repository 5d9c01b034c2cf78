"""Compares old.bin and new.bin (normals_diff.cpp built against two philox.h versions) bit for bit, and each
against double precision from the same Philox words (the CPU kernel's, key 12345 / 678) and the same float32
uniforms and angle. Usage: python normals_compare.py OLD.bin NEW.bin"""
import sys

import numpy as np

from diffaug_kernels import ops


def uniform(v):
    x = v.view(np.int32)
    return np.where(x < 0, ~x, x).astype(np.float32) * np.float32(4.6566127342e-10)


def exact(a, b):
    u1 = np.maximum(uniform(a), np.float32(1e-7)).astype(np.float64)
    th = (np.float32(6.283185307179586) * uniform(b)).astype(np.float64)
    r = np.sqrt(-2 * np.log(u1))
    return r * np.cos(th), r * np.sin(th)


old, new = (np.fromfile(p, np.float32) for p in sys.argv[1:3])
w = ops._philox_uint32(len(old) // 4, 12345 + (678 << 32), 0, backend="cpu").numpy().astype(np.uint32)
n0, n1 = exact(w[:, 0], w[:, 1])
n2, n3 = exact(w[:, 2], w[:, 3])
ref = np.stack([n0, n1, n2, n3], 1).reshape(-1)
d = old != new
eo, en = np.abs(old - ref), np.abs(new - ref)
print(f"{len(old)} normals, {int(d.sum())} differ; largest difference {np.abs(old - new).max():.3e} (absolute)")
print(f"max abs error against double precision: old {eo.max():.3e}, new {en.max():.3e}")
print(f"where they differ: mean abs error old {eo[d].mean():.3e}, new {en[d].mean():.3e}; "
      f"new closer in {int((en < eo)[d].sum())}, old closer in {int((eo < en)[d].sum())}")
