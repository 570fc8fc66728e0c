"""The demo's bundled data: what pipeline.demo_data generates, a golden set held out from training, and a
task that needs the context (each answer is in exactly one passage: the asked-for team's, of the asked kind)."""

from __future__ import annotations

import json
import re

from pipeline import demo_data
from pipeline.demo import CONTEXT, EXPECTED, GOLDEN, QUESTION, SAMPLE


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_shipped_files_are_the_generators_output():
    train, golden = demo_data.generate()
    assert SAMPLE.read_text(encoding="utf-8") == demo_data.dumps(train)
    assert GOLDEN.read_text(encoding="utf-8") == demo_data.dumps(golden)
    assert (SAMPLE, GOLDEN) == (demo_data.SAMPLE_FILE, demo_data.GOLDEN_FILE)


def test_golden_records_are_held_out_and_distinct():
    train, golden = _load(SAMPLE), _load(GOLDEN)
    assert 40 <= len(golden) <= 60 and len(train) >= 10 * len(golden)
    keys = {(r["instruction"], r["input"]) for r in train}
    golden_keys = {(r["instruction"], r["input"]) for r in golden}
    assert len(keys) == len(train) and len(golden_keys) == len(golden)
    assert not keys & golden_keys
    assert not {r["input"] for r in train} & {r["input"] for r in golden}  # not even a context in common


# Read back with patterns of their own, not the generator's templates: kind -> (question, passage) patterns,
# the passage's groups named team and answer.
PATTERNS = {
    "city": (r"Where does the (\w+) team meet\?", r"The (?P<team>\w+) team meets in (?P<answer>\w+)\."),
    "day": (r"On which day is the review of the (\w+) team\?",
            r"The (?P<team>\w+) team has its review on (?P<answer>\w+)\."),
    "lead": (r"Who leads the (\w+) team\?", r"(?P<answer>\w+) leads the (?P<team>\w+) team\."),
}


def _asked(question):
    """(kind, team) the question asks for."""
    (found,) = [(k, m.group(1)) for k, (q, _) in PATTERNS.items() if (m := re.fullmatch(q, question))]
    return found


def _parse(record):
    """(asked kind, asked team, [(kind, team, answer) per passage])."""
    kind, team = _asked(record["instruction"])
    passages = []
    for n, line in enumerate(record["input"].split("\n"), 1):
        head = re.match(rf"\[{n}\] \((\w+)\) ", line)
        body = line[head.end():]
        (found,) = [(k, m["team"], m["answer"]) for k, (_, p) in PATTERNS.items() if (m := re.fullmatch(p, body))]
        passages.append(found)
    return kind, team, passages


def test_one_passage_answers_and_only_with_the_asked_kind_and_team():
    for path in (SAMPLE, GOLDEN):
        for record in _load(path):
            kind, team, passages = _parse(record)
            teams = [p[1] for p in passages]
            assert len(set(teams)) == len(teams) and teams.count(team) == 1
            assert passages[teams.index(team)] == (kind, team, record["output"])
            assert record["output"] in demo_data.KINDS[kind][0]
    for record in _load(GOLDEN):  # a passage of every kind: the question decides which one answers
        assert sorted(p[0] for p in _parse(record)[2]) == sorted(PATTERNS)


def test_the_question_alone_cannot_tell_the_answer():
    """Every question's answers in the training data spread over its whole closed set: only the context says."""
    answers: dict[str, set] = {}
    for record in _load(SAMPLE):
        answers.setdefault(record["instruction"], set()).add(record["output"])
    assert len(answers) == len(demo_data.TEAMS) * len(demo_data.KINDS)
    for question, seen in answers.items():
        assert seen == set(demo_data.KINDS[_asked(question)[0]][0]), question


def test_generator_is_seeded():
    assert demo_data.generate(seed=1, n_train=30, n_golden=5) == demo_data.generate(seed=1, n_train=30, n_golden=5)
    assert demo_data.generate(seed=1, n_train=30, n_golden=5) != demo_data.generate(seed=2, n_train=30, n_golden=5)


def test_the_demo_asks_a_golden_question_with_its_context():
    assert {"instruction": QUESTION, "input": CONTEXT, "output": EXPECTED} in _load(GOLDEN)
