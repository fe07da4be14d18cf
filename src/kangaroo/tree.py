"""Token trees: the shape of a round's drafts when they branch, and the rules that accept a path.

A round verifies rows ``0..n``: row 0 is the last committed token ``y0``, rows ``1..n`` are drafted
tokens, each the child of an earlier row. Rows come in depth-first order (a branch's rows are
contiguous and every row's parent comes before it), so a tree is a few *segments*: runs of rows that
continue the row before them. A chain is one segment.

Why depth-first: the step engine verifies a row by attending over exactly the keys a one-token step
would see for that token, the prefix and the row's ancestors, in that order (``kangaroo.engine``). In
depth-first order the cache slots ``pos + 1 .. pos + depth`` hold precisely the current row's
ancestors if each segment is written at ``pos + depth`` of its first row: a later branch only
overwrites slots deeper than its own fork. So a tree costs what a chain of the same number of rows
costs and keeps every verified row bit-identical to plain decoding.

The accepting rules are pure functions:

* greedy: from the root follow the child whose token is the target's argmax, as long as one exists
  (:func:`greedy_accept_tree`);
* sampling: multi-candidate speculative sampling (SpecInfer's rule, as in EAGLE): the children of a
  row are independent draws from one draft distribution ``q``; each is accepted with probability
  ``min(1, t(x) / q(x))`` where ``t`` starts as the target's ``p`` and becomes ``norm(max(t - q, 0))``
  after each rejection; if every child is rejected the token is drawn from the last ``t``
  (:func:`sample_accept_tree`). Each step draws exactly from ``t``, so the output is distributed
  exactly as plain sampling from the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeLayout:
    """Where a round's rows sit.

    Attributes:
        parents: parent row of rows ``1..n`` (``parents[i - 1]`` for row ``i``; row 0 has none).
        depths: ``[n + 1]`` depth of every row (row 0: 0); row ``i`` sits at position ``pos + depths[i]``.
        segments: ``(first_row, end_row, depth_of_first_row)`` runs in which each row's parent is the
            row before it; written to the cache one run at a time.
    """

    parents: tuple[int, ...]
    depths: tuple[int, ...]
    segments: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, parents: list[int] | tuple[int, ...]) -> "TreeLayout":
        """Check that ``parents`` describe a depth-first tree rooted at row 0 and lay it out."""
        depths = [0]
        stack = [0]  # the current root-to-row path
        segments = [[0, 1, 0]]
        for i, p in enumerate(parents, start=1):
            if not 0 <= p < i:
                raise ValueError(f"row {i}: parent {p} must be an earlier row")
            while stack and stack[-1] != p:  # leave finished branches; p must be on the current path
                stack.pop()
            if not stack:
                raise ValueError(f"row {i}: parent {p} is not on the current path (rows must be depth-first)")
            stack.append(i)
            depths.append(depths[p] + 1)
            if p == i - 1:
                segments[-1][1] = i + 1
            else:
                segments.append([i, i + 1, depths[i]])
        return cls(tuple(parents), tuple(depths), tuple(tuple(s) for s in segments))

    @classmethod
    def chain(cls, n: int) -> "TreeLayout":
        """A chain of ``n`` drafts: row ``i``'s parent is row ``i - 1``."""
        return cls.of(list(range(n)))

    @property
    def rows(self) -> int:
        return len(self.depths)

    @property
    def is_chain(self) -> bool:
        return len(self.segments) == 1

    def children(self, row: int) -> list[int]:
        return [i for i, p in enumerate(self.parents, start=1) if p == row]

    def resident(self, path: list[int]) -> bool:
        """Whether, after the rows were written in order, the cache slots ``pos + 1 ..`` hold ``path``
        (the accepted rows, one per depth): true when each is the last row written at its depth."""
        last: dict[int, int] = {}
        for i, d in enumerate(self.depths):
            last[d] = i
        return all(last[d] == row for d, row in enumerate(path, start=1))


def greedy_accept_tree(tokens: list[int], layout: TreeLayout, target: list[int]) -> tuple[list[int], list[int]]:
    """Follow the target's argmax down the tree.

    Args:
        tokens: drafted ids of rows ``1..n``.
        target: ``[n + 1]`` target argmax after each row.

    Returns:
        ``(new, path)``: the tokens to append (the accepted drafts, then the target's own next token)
        and the accepted rows in depth order. Equals plain greedy decoding.
    """
    new, path, row = [], [], 0
    while True:
        t = target[row]
        new.append(t)
        nxt = next((c for c in layout.children(row) if tokens[c - 1] == t), None)
        if nxt is None:
            return new, path
        path.append(nxt)
        row = nxt


def sample_accept_tree(tokens: list[int], layout: TreeLayout, q: torch.Tensor, p: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """Multi-candidate speculative sampling down the tree.

    Args:
        tokens: drafted ids of rows ``1..n``; the children of one row must be independent draws from
            one distribution.
        q: ``[n, V]`` the distribution row ``i``'s token was drawn from (``q[i - 1]``; siblings share it).
        p: ``[n + 1, V]`` processed target distributions after each row.

    Returns:
        ``(new, path)`` as :func:`greedy_accept_tree`; every token in ``new`` is distributed exactly as
        a draw from the target.
    """
    new, path, row = [], [], 0
    while True:
        t = p[row]
        accepted = None
        for c in layout.children(row):
            x, qc = tokens[c - 1], q[c - 1]
            u = float(torch.rand((), generator=generator, device=p.device))
            if u * float(qc[x]) < float(t[x]):
                accepted = c
                break
            residual = (t - qc).clamp_min(0)
            total = residual.sum()
            t = residual / total if total > 0 else t  # t == q up to rounding: nothing left to correct
        if accepted is None:
            new.append(int(torch.multinomial(t, 1, generator=generator)))
            return new, path
        new.append(tokens[accepted - 1])
        path.append(accepted)
        row = accepted
