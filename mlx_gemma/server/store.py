"""Stored Responses (`store`, `previous_response_id`, GET/DELETE `/v1/responses/{id}`), bounded
by count and by bytes, least recently used first out.

A chain of responses shares its history: each entry refers to the items of the conversation
(earlier inputs and outputs) instead of copying them, and an item is counted, and kept, once
while any entry refers to it. So a 1,000-turn chain costs its items, not 1,000 copies of them."""

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional


@dataclass
class Stored:
    response: dict
    items: list  # the whole conversation: inputs, then this response's output items
    inputs: int  # how many of `items` were its input
    size: int  # the bytes of `response`


class ResponseStore:
    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.entries: OrderedDict[str, Stored] = OrderedDict()
        self.items: dict[int, list] = {}  # id(item) -> [item, bytes, entries referring to it]
        self.bytes = 0

    def get(self, rid: str) -> Optional[Stored]:
        entry = self.entries.get(rid)
        if entry is not None:
            self.entries.move_to_end(rid)
        return entry

    def put(self, rid: str, response: dict, items: list, inputs: int) -> bool:
        """Store it (evicting the least recently used); False if it alone is over the bounds."""
        entry = Stored(response, items, inputs, len(json.dumps(response)))
        new = {id(i): i for i in items if id(i) not in self.items}
        need = entry.size + sum(len(json.dumps(i)) for i in new.values())
        if need > self.max_bytes or self.max_count < 1:
            return False
        for item in items:
            held = self.items.setdefault(id(item), [item, 0, 0])
            if held[2] == 0:
                held[1] = len(json.dumps(item))
                self.bytes += held[1]
            held[2] += 1
        self.entries[rid] = entry
        self.bytes += entry.size
        while len(self.entries) > self.max_count or self.bytes > self.max_bytes:
            self.delete(next(iter(self.entries)))
        return rid in self.entries

    def delete(self, rid: str) -> bool:
        entry = self.entries.pop(rid, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        for item in entry.items:
            held = self.items[id(item)]
            held[2] -= 1
            if held[2] == 0:
                self.bytes -= held[1]
                del self.items[id(item)]
        return True
