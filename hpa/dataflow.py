"""Reading predecessors off a dataflow graph: shared by every loader that builds one.

A loader's graph has nodes with inputs; some nodes are layers (or the model
input).  For a layer, its predecessors are the layers reached by walking back
through the non-layer nodes, and ``via`` lists the operations passed on the way.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, TypeVar

from hpa.graph import INPUT

N = TypeVar("N")


def predecessors(
    sources: Iterable[N],
    endpoint: Callable[[N], str | None],
    inputs: Callable[[N], Iterable[N]],
    op: Callable[[N], str | None],
    key: Callable[[N], Hashable] = id,
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """Walk back from ``sources`` (the nodes feeding one layer).

    ``endpoint(node)`` names a layer (or :data:`INPUT`) where the walk stops, or
    returns None for an operation to pass through, recording ``op(node)``
    (unless that is None: identities at inference such as dropout are passed
    silently, since exporters drop them and ``via`` must agree across backends).
    Returns the predecessor names (input first, then sorted) and, per
    predecessor, the operations passed from it to the layer, in order (each
    path's ops in order; a second path adds only the ops not yet listed).
    """
    found: dict[str, list[str]] = {}
    todo = [(source, ()) for source in sources]
    # A node reached again with the same *set* of ops adds nothing new: every path on from it
    # was walked (depth first) before.  Keying on the set rather than the sequence keeps the walk
    # linear in chains of op diamonds (x * sigmoid(x), decomposed norms), where the number of
    # distinct sequences doubles with each diamond.
    visited: set[tuple[Hashable, frozenset[str]]] = set()
    while todo:
        current, ops = todo.pop()
        state = (key(current), frozenset(ops))
        if state in visited:
            continue
        visited.add(state)
        name = endpoint(current)
        if name is not None:
            path = found.setdefault(name, [])
            path += [o for o in reversed(ops) if o not in path]
            continue
        name = op(current)
        passed = ops + (name,) if name else ops
        todo += [(source, passed) for source in inputs(current)]
    order = sorted(found, key=lambda n: (n != INPUT, n))
    return tuple(order), {n: tuple(found[n]) for n in order}
