"""Threefry-2x32 with 20 rounds, the block cipher under jax.random's default PRNG.

Written out from Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011),
not from JAX. A sampling row's key is fold_in(PRNGKey(seed), sample_index): PRNGKey(seed)
is the key (seed >> 32, seed & 0xFFFFFFFF), and fold_in(key, i) enciphers the counter
(0, i) under it.
"""

MASK = 0xFFFFFFFF
ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)


def threefry2x32(key: tuple[int, int], counter: tuple[int, int]) -> tuple[int, int]:
    schedule = (key[0], key[1], 0x1BD11BDA ^ key[0] ^ key[1])
    x0, x1 = (counter[0] + schedule[0]) & MASK, (counter[1] + schedule[1]) & MASK
    for r in range(20):
        x0 = (x0 + x1) & MASK
        rot = ROTATIONS[r % 8]
        x1 = (((x1 << rot) | (x1 >> (32 - rot))) & MASK) ^ x0
        if r % 4 == 3:  # key injection after every four rounds
            i = r // 4 + 1
            x0 = (x0 + schedule[i % 3]) & MASK
            x1 = (x1 + schedule[(i + 1) % 3] + i) & MASK
    return x0, x1
