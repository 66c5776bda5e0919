#!/usr/bin/env python3
"""Independent Python reference for core/rng.h: Philox4x32-10 written from the paper (Salmon et al. 2011),
plus moerl's stream layout, u01 and Box-Muller conventions. Prints the golden values used by tests/test_rng.c."""
import math

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF

def philox(ctr, key, rounds=10):
    c = list(ctr); k = list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + W0) & MASK, (k[1] + W1) & MASK]
        p0 = M0 * c[0]; p1 = M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k[1]) & MASK, p0 & MASK]
    return c

def block(seed, stream, b):
    return philox([b & MASK, b >> 32, stream & MASK, stream >> 32], [seed & MASK, seed >> 32])

def normal_at(seed, stream, i):
    w = block(seed, stream, i)
    u1 = ((w[0] >> 8) + 1.0) / 16777216.0
    u2 = (w[1] >> 8) / 16777216.0
    import struct
    f32 = lambda v: struct.unpack('f', struct.pack('f', v))[0]
    return f32(math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2))

if __name__ == '__main__':
    seed, stream = 0x0123456789ABCDEF, 42
    for b in (0, 1, 0x100000000):
        print('block', hex(b), ['0x%08x' % x for x in block(seed, stream, b)])
    for i in (0, 1, 7, 1000003):
        print('normal', i, repr(normal_at(seed, stream, i)))
