"""The demo's data: a synthetic retrieval task that a tiny random Llama learns with LoRA on two CPU cores.

Each record asks one thing about one team: where it meets, on which day its review is, or who leads it.
Its context holds PASSAGES retrieved passages, each about another team and each of another kind, in
random order; the answer is in the asked-for team's passage, the one of the asked kind. Every answer is
drawn per record from a closed set (KINDS), so the question alone says only which set: without the context
a model can only guess. Closed sets, because a model this small did not learn to copy arbitrary strings
(../shared/notes/demo-task.md); nor, with Llama 2's rope_theta, to tell the asked team's passage from others
of the same kind within the demo's budget. It does learn to pick the passage of the asked kind and copy
its answer.

`python -m pipeline.demo_data` rewrites data/sample_alpaca.json (training) and data/golden_alpaca.json
(a held-out golden set: no question-and-context pair, nor any context, of it is in the training file)
from SEED.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SAMPLE_FILE, GOLDEN_FILE = DATA_DIR / "sample_alpaca.json", DATA_DIR / "golden_alpaca.json"
SEED, N_TRAIN, N_GOLDEN, PASSAGES = 23, 4000, 50, 3

TEAMS = ("design", "finance", "legal", "robotics", "sales", "support", "security", "research", "marketing",
         "hiring", "data", "travel")
SOURCES = ("calendar", "wiki", "mail", "handbook")
# kind -> (its closed set of answers, the passage that states one, the question that asks for it)
KINDS = {
    "city": (("Lisbon", "Oslo", "Dublin", "Vienna", "Prague", "Madrid", "Berlin", "Warsaw", "Athens", "Zurich",
              "Helsinki", "Brussels"),
             "The {team} team meets in {answer}.", "Where does the {team} team meet?"),
    "day": (("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
            "The {team} team has its review on {answer}.", "On which day is the review of the {team} team?"),
    "lead": (("Maria", "Kenji", "Amara", "Lukas", "Priya", "Omar", "Sofia", "Tomas", "Ingrid", "Mateo", "Chen",
              "Nadia"),
             "{answer} leads the {team} team.", "Who leads the {team} team?"),
}


def record(rng: random.Random, passages: int = PASSAGES) -> dict[str, str]:
    """One question, `passages` retrieved passages (each about another team, the first len(KINDS) of
    another kind; one answers the question), and the answer."""
    teams = rng.sample(TEAMS, passages)
    kinds = rng.sample(list(KINDS), len(KINDS))
    kinds = (kinds * passages)[:passages]
    answers = [rng.choice(KINDS[kind][0]) for kind in kinds]
    lines = [f"[{i + 1}] ({rng.choice(SOURCES)}) " + KINDS[kind][1].format(team=team, answer=answer)
             for i, (kind, team, answer) in enumerate(zip(kinds, teams, answers))]
    asked = rng.randrange(passages)
    return {"instruction": KINDS[kinds[asked]][2].format(team=teams[asked]), "input": "\n".join(lines),
            "output": answers[asked]}


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_golden: int = N_GOLDEN,
             passages: int = PASSAGES) -> tuple[list[dict], list[dict]]:
    """(training records, golden records), each with a context of its own: no golden question comes with a
    context that training saw."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n_train + n_golden:
        item = record(rng, passages)
        if item["input"] not in seen:
            seen.add(item["input"])
            out.append(item)
    return out[:n_train], out[n_train:]


def dumps(records: list[dict]) -> str:
    """The JSON text the shipped files hold: a record a line (thousands of records stay readable and small),
    in one stable form, so a test can compare them byte for byte."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def write(sample: Path = SAMPLE_FILE, golden: Path = GOLDEN_FILE) -> None:
    train, held_out = generate()
    sample.write_text(dumps(train), encoding="utf-8")
    golden.write_text(dumps(held_out), encoding="utf-8")


if __name__ == "__main__":
    write()
    print(f"wrote {SAMPLE_FILE} and {GOLDEN_FILE}")
