"""Spec-Bench questions: locate the file, read it, pick categories, take a seeded sample.

Spec-Bench (Xia et al. 2024) has six task groups. Its MT-bench questions carry their MT-bench
sub-category (writing, roleplay, ...) in ``category``; Spec-Bench's ``speed.py`` groups those eight
as ``mt_bench``, and so do we (:func:`task_of`). Answer files keep the original category.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..errors import KangarooError

ENV_VAR = "KANGAROO_SPEC_BENCH"  # path of a question.jsonl, overriding the search below
RELATIVE = Path("shared") / "data" / "spec_bench" / "question.jsonl"
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")  # Spec-Bench's order


def task_of(category: str) -> str:
    """Spec-Bench task group of a question category (MT-bench sub-categories -> ``mt_bench``)."""
    return "mt_bench" if category in MT_BENCH else category


def task_order(tasks) -> list[str]:
    """Spec-Bench's order first, anything else alphabetically after it."""
    tasks = set(tasks)
    return [t for t in TASKS if t in tasks] + sorted(tasks - set(TASKS))


def default_question_file() -> Path:
    """``$KANGAROO_SPEC_BENCH``, else the first ``shared/data/spec_bench/question.jsonl`` found walking up
    from the working directory and from this package's location."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise KangarooError(f"${ENV_VAR} points to {str(path)!r}, which is not a file")
        return path
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            if (folder / RELATIVE).is_file():
                return folder / RELATIVE
    raise KangarooError(
        f"Spec-Bench questions not found: no {RELATIVE} above {starts[0]}; pass --questions FILE "
        f"(github.com/hemingkx/Spec-Bench, data/spec_bench/question.jsonl) or set ${ENV_VAR}"
    )


def load_questions(
    path: str | os.PathLike | None = None,
    categories: list[str] | None = None,
    per_category: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Read questions (``{"question_id", "category", "turns": [str, ...]}`` per line).

    Args:
        categories: keep these Spec-Bench tasks (``mt_bench`` or a raw category name like ``writing``).
        per_category: keep a seeded random sample of this many questions per task, in file order.
        seed: sampling seed.
    """
    path = Path(path) if path else default_question_file()
    if not path.is_file():
        raise KangarooError(f"question file {str(path)!r} does not exist")
    questions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                ok = isinstance(q["turns"], list) and q["turns"] and all(isinstance(t, str) for t in q["turns"])
                q = {"question_id": q["question_id"], "category": str(q["category"]), "turns": q["turns"]}
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise KangarooError(f"{path}:{n}: not a question (need question_id, category, turns: [str])")
            questions.append(q)
    if categories:
        known = {task_of(q["category"]) for q in questions} | {q["category"] for q in questions}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise KangarooError(f"unknown categories {', '.join(unknown)}: {path} has {', '.join(task_order({task_of(c) for c in known}))}")
        questions = [q for q in questions if q["category"] in categories or task_of(q["category"]) in categories]
    if per_category is not None:
        if per_category <= 0:
            raise KangarooError(f"--per-category must be > 0, got {per_category}")
        rng = random.Random(seed)
        keep = set()
        for task in task_order({task_of(q["category"]) for q in questions}):
            members = [i for i, q in enumerate(questions) if task_of(q["category"]) == task]
            keep.update(rng.sample(members, min(per_category, len(members))))
        questions = [q for i, q in enumerate(questions) if i in keep]
    if not questions:
        raise KangarooError(f"no questions left in {path} after filtering")
    return questions
