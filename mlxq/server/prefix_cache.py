"""The server's prefix cache: finished conversations' KV caches, reused by later requests.

Agents and chat front-ends resend the whole history every turn, so a new request usually
starts with the tokens of an earlier one (its prompt and its reply). Entries are
``mlxq.prompt_cache.PromptCache`` objects (held in the server's KV format, so int4 with
--kv-bits 4: a third of fp16's bytes), LRU-evicted to stay within ``max_entries`` and
``max_bytes``. A hit hands out a copy trimmed to the common prefix (see
``mlxq.prompt_cache.reuse_prefix``); the entry itself stays for the next request.

Only the scheduler thread touches it (no locking).
"""

from collections import OrderedDict

from ..prompt_cache import PromptCache, common_prefix_length, reuse_prefix


class PrefixCache:
    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[tuple, PromptCache]" = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt_ids) -> PromptCache | None:
        """A private copy of the entry sharing the longest prefix with ``prompt_ids``,
        trimmed to that prefix; None when no entry shares at least one usable token."""
        best, best_len = None, 0
        for key, entry in self._entries.items():
            n = min(common_prefix_length(key, prompt_ids), len(prompt_ids) - 1)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None
        self._entries.move_to_end(best)
        copy = self._entries[best].copy()
        reuse_prefix(copy, prompt_ids)
        return copy

    def insert(self, prompt_cache: PromptCache) -> None:
        """Keep ``prompt_cache`` (taken over, not copied); drops entries it extends and
        the least recently used ones beyond the bounds. Too big alone: not kept."""
        key = tuple(prompt_cache.tokens)
        size = prompt_cache.nbytes
        if self.max_entries < 1 or size > self.max_bytes or not key:
            return
        # An entry that is a prefix of this one adds nothing: this one answers its hits.
        for old in [k for k in self._entries if len(k) <= len(key) and key[:len(k)] == k]:
            self._remove(old)
        self._entries[key] = prompt_cache
        self.nbytes += size
        self.shrink(self.max_bytes)

    def shrink(self, max_bytes: int) -> None:
        """Evict least recently used entries until at most ``max_bytes`` and
        ``max_entries`` remain."""
        while self._entries and (self.nbytes > max_bytes or len(self._entries) > self.max_entries):
            self._remove(next(iter(self._entries)))

    def _remove(self, key) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
