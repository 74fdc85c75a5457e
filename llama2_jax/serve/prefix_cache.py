"""Which prompt prefixes have their KV in the block pool (serve.programs.init_pool): the host-side index of the
prefix cache, as vLLM's automatic prefix caching and SGLang's RadixAttention keep it.

A prompt is cut into blocks of T tokens; block j is keyed by a digest of every token up to its end (SHA-256 chained
over the blocks, so equal keys mean equal prefixes, not merely equal blocks). Only full blocks strictly before the
prompt's last token are cached (the last token is always fed by the decode step). The pool has a fixed number of
blocks (the memory bound); when it is full the least recently used block is reused. Blocks are copied into a slot
when a request starts (no sharing of live memory), so a block can be evicted at any time.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


class PrefixCache:
    """The index of a pool of `n_blocks` blocks of `block` tokens."""

    def __init__(self, n_blocks: int, block: int):
        if n_blocks < 1 or block < 1:
            raise ValueError(f"a prefix cache needs >= 1 block of >= 1 token, got {n_blocks} of {block}")
        self.n_blocks, self.block = n_blocks, block
        self._blocks: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # least recent first
        self._free = list(range(n_blocks - 1, -1, -1))
        self.lookup_tokens = 0  # prompt tokens that could have been cached (full blocks before the last token)
        self.hit_tokens = 0  # of those, found in the cache

    def digests(self, prompt: list[int]) -> list[bytes]:
        """The keys of the prompt's cacheable blocks: full blocks within prompt[:-1]."""
        keys, digest = [], b""
        tokens = np.asarray(prompt, np.int32)
        for j in range((len(prompt) - 1) // self.block):
            digest = hashlib.sha256(digest + tokens[j * self.block:(j + 1) * self.block].tobytes()).digest()
            keys.append(digest)
        return keys

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The pool blocks of the longest cached run of keys from the first (each marked as just used)."""
        found = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        self.lookup_tokens += len(keys) * self.block
        self.hit_tokens += len(found) * self.block
        return found

    def allocate(self, keys: list[bytes], keep: int) -> list[int]:
        """Pool blocks for `keys` (not cached yet), reusing the least recently used blocks when the pool is full but
        never the `keep` most recently used ones (the blocks the caller just looked up); may return fewer blocks than
        keys (then the first ones)."""
        out = []
        for key in keys:
            if self._free:
                block = self._free.pop()
            elif len(self._blocks) > keep + len(out):  # the oldest is neither looked up nor new
                _, block = self._blocks.popitem(last=False)
            else:
                break
            self._blocks[key] = block
            out.append(block)
        return out

    def clear(self) -> None:
        self._blocks.clear()
        self._free = list(range(self.n_blocks - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._blocks)
