"""nnx.split for jit: the GraphDef as a static argument that is hashed once, not on every call.

jax.jit hashes its static arguments on every call, and a GraphDef's hash walks the whole graph:
tens of milliseconds for a 40-block DiT, on the host, before the step's kernels start (this and a
second nnx.split of the DiT idled an H200 ~1 s in a 14B fast-path run of 4 steps, benchmarks/NOTES.md,
2026-11-30 session 5). `split` returns the
GraphDef in a `StaticGraph` that carries its hash; equal GraphDefs share one StaticGraph (interned),
so jit's cache lookups after the first compare by identity.
"""

import dataclasses
import functools

from flax import nnx

__all__ = ["StaticGraph", "split"]


@dataclasses.dataclass(frozen=True, eq=False)
class StaticGraph:
    """An nnx GraphDef with its hash computed once; `graphdef` is what nnx.merge takes."""

    graphdef: nnx.graph.GraphDef
    digest: int

    def __hash__(self) -> int:
        return self.digest

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        return isinstance(other, StaticGraph) and self.digest == other.digest and self.graphdef == other.graphdef


@functools.lru_cache(maxsize=16)
def _interned(graph: StaticGraph) -> StaticGraph:
    return graph  # the first of the equal ones (the cache compares by its digest, then by its GraphDef)


def split(module: nnx.Module, *filters) -> tuple:
    """Returns nnx.split(module, *filters) with its GraphDef as an interned StaticGraph."""
    graphdef, *states = nnx.split(module, *filters)
    return (_interned(StaticGraph(graphdef, hash(graphdef))), *states)
