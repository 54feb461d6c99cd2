"""The embedded default data set: a long-tail corpus of facts about invented people.

Every entity has one value per attribute (birth city, occupation, ...). Documents state a few
of one entity's facts in varied sentence templates, and entities are drawn with Zipf
frequencies, so a few are mentioned thousands of times and most only a handful. The names
are invented, so the only way to predict an attribute after a name is to have memorised the
fact: exactly what memory layers should help with, and measurably so per frequency bucket
(``questions.jsonl``, scored by ``memtron.eval.facts.fact_accuracy``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from memtron.data.jsonl import jsonl_rows

# Every template names the entity before the value, so its prefix up to the value is a
# question prompt. Prefixes differ across attributes, so each prompt asks for one attribute.
ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    "birth_city": {
        "values": [
            "Lisbon", "Paris", "Oslo", "Cairo", "Lima", "Quito", "Dublin", "Vienna", "Prague",
            "Madrid", "Rome", "Athens", "Berlin", "Warsaw", "Tokyo", "Seoul", "Delhi",
            "Nairobi", "Havana", "Sydney",
        ],
        "templates": [
            "{name} was born in {value}.",
            "The birthplace of {name} is {value}.",
            "{name} comes from the city of {value}.",
        ],
    },
    "occupation": {
        "values": [
            "baker", "carpenter", "doctor", "farmer", "lawyer", "nurse", "pilot", "painter",
            "teacher", "writer", "banker", "chemist", "dentist", "gardener", "jeweler",
            "potter", "sailor", "tailor", "weaver", "plumber",
        ],
        "templates": [
            "{name} works as a {value}.",
            "By profession, {name} is a {value}.",
            "{name} earns a living as a {value}.",
        ],
    },
    "colour": {
        "values": [
            "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
            "white", "grey", "teal", "gold", "silver", "violet",
        ],
        "templates": [
            "{name}'s favourite colour is {value}.",
            "The favourite colour of {name} is {value}.",
            "{name} likes the colour {value} best.",
        ],
    },
    "pet": {
        "values": [
            "cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "lizard",
            "ferret", "horse", "goat", "snake", "canary", "pony", "mouse",
        ],
        "templates": [
            "{name} has a pet {value}.",
            "The pet of {name} is a {value}.",
            "{name} looks after a pet {value}.",
        ],
    },
    "instrument": {
        "values": [
            "piano", "violin", "guitar", "cello", "flute", "drums", "harp", "trumpet",
            "clarinet", "banjo", "oboe", "saxophone",
        ],
        "templates": [
            "{name} plays the {value}.",
            "The instrument of {name} is the {value}.",
            "{name} practises the {value} every evening.",
        ],
    },
}

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
          "kr", "st", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "x"]

# Entity frequency ranks (1 = most mentioned in train) that form each question bucket, as
# fractions of n_entities: head = top 2 %, torso = the next 18 %, tail = everyone else.
BUCKET_RANK_FRACTIONS = {"head": (0.0, 0.02), "torso": (0.02, 0.20), "tail": (0.20, 1.0)}
SENTENCES_PER_DOC = (2, 4)  # inclusive range; each sentence states a different attribute


def _make_names(rng: np.random.Generator, n: int) -> list[str]:
    def word(n_syllables: int) -> str:
        parts = [
            ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
            for _ in range(n_syllables)
        ]
        return ("".join(parts) + CODAS[rng.integers(len(CODAS))]).capitalize()

    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = f"{word(2)} {word(int(rng.integers(2, 4)))}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _render_docs(
    rng: np.random.Generator,
    names: list[str],
    facts: np.ndarray,
    probabilities: np.ndarray,
    n_docs: int,
    mentions: np.ndarray | None = None,
    fact_templates: dict[tuple[int, int], dict[int, int]] | None = None,
) -> list[str]:
    """Draw one entity per document (Zipf) and state 2-4 of its facts.

    When given, ``mentions`` counts sentences per entity and ``fact_templates`` counts, per
    (entity, attribute), how often each template stated it: the question set is built from them.
    """
    attribute_names = list(ATTRIBUTES)
    entities = rng.choice(len(names), size=n_docs, p=probabilities)
    docs = []
    for entity in entities:
        n_sentences = int(rng.integers(SENTENCES_PER_DOC[0], SENTENCES_PER_DOC[1] + 1))
        sentences = []
        for attribute in rng.permutation(len(attribute_names))[:n_sentences]:
            spec = ATTRIBUTES[attribute_names[attribute]]
            template = int(rng.integers(len(spec["templates"])))
            value = spec["values"][facts[entity, attribute]]
            sentences.append(spec["templates"][template].format(name=names[entity], value=value))
            if mentions is not None and fact_templates is not None:
                mentions[entity] += 1
                counts = fact_templates.setdefault((int(entity), int(attribute)), {})
                counts[template] = counts.get(template, 0) + 1
        docs.append(" ".join(sentences))
    return docs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_corpus(
    out_dir: str | Path,
    n_entities: int = 1000,
    n_train_docs: int = 8000,
    n_valid_docs: int = 500,
    zipf: float = 1.0,
    seed: int = 0,
    questions_per_bucket: int = 100,
) -> dict:
    """Write ``raw/train.jsonl``, ``raw/valid.jsonl``, ``questions.jsonl`` and ``synth.json``.

    The defaults give ~1 MB of training text: one pass of the tiny-cpu recipe (600 steps of
    16 x 128 byte tokens) sees each head fact (top 2 % of entities) ~100 times on average and
    each tail fact at most a few times. Deterministic for a seed.
    """
    if n_entities < 1 or n_train_docs < 1 or n_valid_docs < 0 or questions_per_bucket < 0:
        raise ValueError(
            "generate_corpus: n_entities and n_train_docs must be >= 1, n_valid_docs and "
            "questions_per_bucket >= 0"
        )
    if zipf < 0:
        raise ValueError(f"generate_corpus: zipf exponent must be >= 0, got {zipf}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    attribute_names = list(ATTRIBUTES)
    names = _make_names(rng, n_entities)
    facts = np.stack(
        [rng.integers(len(ATTRIBUTES[a]["values"]), size=n_entities) for a in attribute_names],
        axis=1,
    )
    # Zipf weights over a random ranking, so frequency is unrelated to the name's spelling.
    weights = np.empty(n_entities)
    weights[rng.permutation(n_entities)] = 1.0 / np.arange(1, n_entities + 1) ** zipf
    probabilities = weights / weights.sum()

    mentions = np.zeros(n_entities, dtype=np.int64)
    fact_templates: dict[tuple[int, int], dict[int, int]] = {}
    train_docs = _render_docs(
        rng, names, facts, probabilities, n_train_docs, mentions, fact_templates
    )
    valid_docs = _render_docs(rng, names, facts, probabilities, n_valid_docs)

    # Buckets by observed training mentions (ties broken by entity id, for determinism).
    by_frequency = np.lexsort((np.arange(n_entities), -mentions))
    buckets: dict[str, dict] = {}
    questions: list[dict] = []
    for bucket, (lo, hi) in BUCKET_RANK_FRACTIONS.items():
        first, last = int(round(lo * n_entities)), int(round(hi * n_entities))
        members = [int(e) for e in by_frequency[first:last] if mentions[e] > 0]
        # Only facts stated at least once in train are asked: the rest are unknowable.
        candidates = [(e, a) for e in members for a in range(len(attribute_names))
                      if (e, a) in fact_templates]
        chosen = rng.permutation(len(candidates))[:questions_per_bucket]
        for index in sorted(int(i) for i in chosen):
            entity, attribute = candidates[index]
            spec = ATTRIBUTES[attribute_names[attribute]]
            seen_templates = sorted(fact_templates[(entity, attribute)])
            template = spec["templates"][seen_templates[rng.integers(len(seen_templates))]]
            prompt = template[: template.index(" {value}")].format(name=names[entity])
            questions.append({
                "prompt": prompt,
                "answer": " " + spec["values"][facts[entity, attribute]],
                "choices": [" " + v for v in spec["values"]],
                "bucket": bucket,
                "entity": names[entity],
                "attribute": attribute_names[attribute],
                "train_count": sum(fact_templates[(entity, attribute)].values()),
            })
        member_mentions = mentions[members] if members else np.zeros(1, dtype=np.int64)
        buckets[bucket] = {
            "frequency_ranks": [first + 1, last],
            "n_entities": len(members),
            "min_mentions": int(member_mentions.min()),
            "max_mentions": int(member_mentions.max()),
            "n_questions": min(len(candidates), questions_per_bucket),
        }

    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    _write_jsonl(raw / "train.jsonl", [{"text": d} for d in train_docs])
    _write_jsonl(raw / "valid.jsonl", [{"text": d} for d in valid_docs])
    _write_jsonl(out / "questions.jsonl", questions)
    summary = {
        "params": {
            "n_entities": n_entities, "n_train_docs": n_train_docs,
            "n_valid_docs": n_valid_docs, "zipf": zipf, "seed": seed,
            "questions_per_bucket": questions_per_bucket,
            "sentences_per_doc": list(SENTENCES_PER_DOC),
        },
        "attributes": {a: len(ATTRIBUTES[a]["values"]) for a in attribute_names},
        "buckets": buckets,
        "bucket_rule": "entities ranked by training mentions (sentences naming them); "
                       "frequency_ranks are 1-based inclusive; entities never mentioned and "
                       "facts never stated in train get no questions",
        "counts": {
            "train_docs": len(train_docs), "valid_docs": len(valid_docs),
            "train_chars": sum(len(d) for d in train_docs),
            "valid_chars": sum(len(d) for d in valid_docs),
            "train_sentences": int(mentions.sum()),
            "entities_mentioned": int((mentions > 0).sum()),
            "questions": len(questions),
        },
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_questions(path: str | Path) -> list[dict]:
    """Read ``questions.jsonl``; each row needs prompt, answer and choices (answer among them)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: questions file does not exist")
    questions = []
    for line_no, row in jsonl_rows(file):
        missing = [k for k in ("prompt", "answer", "choices") if k not in row]
        if missing:
            raise ValueError(f"{file}:{line_no}: missing key(s) {', '.join(missing)}")
        if row["answer"] not in row["choices"]:
            raise ValueError(f"{file}:{line_no}: answer {row['answer']!r} is not in choices")
        questions.append(row)
    return questions
