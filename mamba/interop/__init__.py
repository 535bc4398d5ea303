"""Checkpoint interop: readers turn a foreign layout into a `Checkpoint` (our config + lazily
produced tensors under native state-spaces names); writers stream one to a folder."""
