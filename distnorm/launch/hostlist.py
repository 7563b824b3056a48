"""Slurm's compact host and task lists, expanded without Slurm.

``SLURM_JOB_NODELIST`` holds ``gpu[01-03,7],login`` and ``SLURM_TASKS_PER_NODE``
holds ``2(x3),1``; :func:`expand_hostlist` and :func:`expand_tasks_per_node` turn
them into plain lists, as ``scontrol show hostnames`` would.
"""

from __future__ import annotations

import re
from typing import List

__all__ = ["expand_hostlist", "expand_tasks_per_node"]


def _split_top_level(text: str) -> List[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_one(item: str) -> List[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    hosts: List[str] = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])  # Slurm keeps the zero padding of the lower bound
            values = [str(i).zfill(width) for i in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise ValueError(f"bad range {part!r} in Slurm host list item {item!r}")
        for value in values:
            hosts.extend(_expand_one(head + value + tail))  # later brackets: cross product
    return hosts


def expand_hostlist(hostlist: str) -> List[str]:
    """Expand a Slurm host list as ``scontrol show hostnames`` does, without Slurm.

    Example:
        >>> expand_hostlist("gpu[01-03,7],login")
        ['gpu01', 'gpu02', 'gpu03', 'gpu7', 'login']
        >>> expand_hostlist("r[1-2]n[1-2]")
        ['r1n1', 'r1n2', 'r2n1', 'r2n2']

    Raises:
        ValueError: unbalanced brackets or a range that is not ``lo-hi`` digits.
    """
    hosts: List[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def expand_tasks_per_node(spec: str) -> List[int]:
    """Expand ``SLURM_TASKS_PER_NODE`` syntax: ``"2(x3),1"`` → ``[2, 2, 2, 1]``.

    Raises:
        ValueError: an item is neither ``N`` nor ``N(xK)``.
    """
    counts: List[int] = []
    for item in spec.strip().split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise ValueError(f"bad item {item!r} in Slurm tasks-per-node {spec!r} (expected N or N(xK))")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts
