"""Generate the bundled corpora: ``python -m data.make_corpus [--out data/corpus]``.

Everything is produced by seeded rules (no downloads, no licences to track), so the files in
data/corpus are reproducible byte for byte; tests/test_data_corpus.py checks that.

* ``tiny_corpus.jsonl`` ({"text"}): pretraining text with plenty of learnable structure:
  a small English-like grammar, a fixed table of invented facts (stated many times),
  arithmetic, counting and lists, and question/answer drills in the fine-tuning format.
* ``qa_train.jsonl`` / ``qa_test.jsonl`` ({"input", "output"}): questions whose answers follow
  simple rules a tiny byte-level model can pick up (parity, successor, first letter, copy,
  upper case, reversal, one-digit sums, and a colour rule on invented city names). Test
  questions never appear in the training file nor in the corpus.
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
CORPUS_DOCS = 8000
TEST_PER_TASK = 40

WORDS = [
    "apple", "bread", "chair", "dog", "egg", "fish", "goat", "hat", "ink", "jam", "kite", "lamp",
    "moon", "nest", "owl", "pen", "queen", "rain", "sun", "tree", "umbrella", "van", "wolf", "yarn",
    "zebra", "ball", "cake", "door", "farm", "gate", "hill", "iron", "jar", "key", "leaf", "milk",
    "nut", "oak", "pig", "ring", "salt", "toy", "vase", "wall", "box", "cup", "desk", "fox", "gold",
    "horn", "kid", "lion", "map", "net", "orange", "pot", "rose", "ship", "tent", "bird", "cat",
    "cow", "duck", "frog", "bee", "bell", "boat", "book", "coat", "drum", "fan", "fork", "glass",
    "hand", "king", "lake", "road", "rock", "sand", "sea", "snow", "star", "stone", "wind", "wood",
    "bag", "bed", "bus", "car", "cloud", "corn", "crab", "deer", "dust", "field", "fire", "flag",
    "flower", "grass", "house", "lemon", "mouse", "river", "seed", "sheep", "shoe", "silk", "sock",
    "soup", "spoon", "table", "tiger", "train", "wheel"
]
ADJECTIVES = [
    "small", "big", "red", "green", "old", "young", "quiet", "happy", "cold", "warm", "bright",
    "dark", "tall", "short", "brave", "kind"
]
NOUNS = [
    "dog", "cat", "bird", "child", "farmer", "teacher", "baker", "sailor", "king", "queen", "fox",
    "horse", "boy", "girl", "friend"
]
VERBS = [
    "runs to", "walks to", "looks at", "sings near", "waits by", "sleeps under", "jumps over", "reads in"
]
PLACES = [
    "the river", "the market", "the old tree", "the school", "the hill", "the garden", "the sea",
    "the bridge", "the farm"
]
TIMES = [
    "in the morning", "at night", "after lunch", "before dinner", "on Sunday", "in the spring",
    "every day"
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December"
]
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve"
]
SYLLABLES = [
    "ka", "lo", "mi", "ra", "ten", "bor", "sil", "va", "den", "po", "ri", "zan", "mel", "tor", "ul",
    "fen", "a", "e", "o"
]


def city_names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        names.add(name.capitalize())
    return sorted(names)


def sky_colour(city: str) -> str:
    """The deterministic rule behind "What colour is the sky in <city>?"."""
    return "blue" if city[-1] in "aeiou" else "grey"


def qa_tasks(cities: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) each task can produce, in a fixed order."""
    short = [w for w in WORDS if len(w) <= 5]
    return {
        "parity": [(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd") for n in range(300)],
        "successor": [(f"What comes after {n}?", str(n + 1)) for n in range(200)],
        "first_letter": [(f"What is the first letter of '{w}'?", w[0]) for w in WORDS],
        "repeat": [(f"Repeat the word '{w}'.", w) for w in WORDS],
        "upper": [(f"Write '{w}' in capitals.", w.upper()) for w in WORDS],
        "reverse": [(f"Reverse the word '{w}'.", w[::-1]) for w in short],
        "sum": [(f"What is {a} plus {b}?", str(a + b)) for a in range(10) for b in range(10)],
        "sky": [(f"What colour is the sky in {c}?", sky_colour(c)) for c in cities],
    }


def split_qa(rng: random.Random, cities: list[str]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    train: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for items in qa_tasks(cities).values():
        items = list(items)
        rng.shuffle(items)
        test += [{"input": q, "output": a} for q, a in items[:TEST_PER_TASK]]
        train += [{"input": q, "output": a} for q, a in items[TEST_PER_TASK:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


@dataclass(frozen=True)
class World:
    """What the corpus may talk about: training cities and questions only."""

    facts: dict[str, str]  # city -> country
    drills: list[dict[str, str]]
    held_out: frozenset[str]  # test questions

    @property
    def cities(self) -> list[str]:
        return sorted(self.facts)


def sentence(rng: random.Random) -> str:
    subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    text = f"{subject} {rng.choice(VERBS)} {rng.choice(PLACES)} {rng.choice(TIMES)}."
    return text[0].upper() + text[1:]


def story(rng: random.Random, world: World) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))


def fact_doc(rng: random.Random, world: World) -> str:
    lines = []
    for city in rng.sample(world.cities, 4):
        lines.append(f"{city} is a city in {world.facts[city]}. The sky in {city} is {sky_colour(city)}.")
    return " ".join(lines)


def arithmetic_doc(rng: random.Random, world: World) -> str:
    lines = []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            if f"What is {a} plus {b}?" in world.held_out:
                continue
            lines.append(f"{a} plus {b} is {a + b}.")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} minus {b} is {a - b}.")
    return " ".join(lines)


def list_doc(rng: random.Random, world: World) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        start = rng.randrange(7)
        return "The days of the week: " + ", ".join(DAYS[start:] + DAYS[:start]) + "."
    if kind == 1:
        start = rng.randrange(12)
        return "The months: " + ", ".join(MONTHS[start:] + MONTHS[:start]) + "."
    if kind == 2:
        start = rng.randrange(80)
        return "Counting: " + ", ".join(str(n) for n in range(start, start + rng.randint(8, 20))) + "."
    end = rng.randint(4, 12)
    return "Counting in words: " + ", ".join(NUMBER_WORDS[: end + 1]) + "."


def drill_doc(rng: random.Random, world: World) -> str:
    picks = rng.sample(world.drills, rng.randint(3, 6))
    return "\n".join(f"Question: {d['input']}\nAnswer: {d['output']}" for d in picks)


GENERATORS: list[tuple[Callable[..., str], float]] = [
    (story, 0.35), (fact_doc, 0.15), (arithmetic_doc, 0.15), (list_doc, 0.1), (drill_doc, 0.25),
]


def make_corpus(rng: random.Random, world: World) -> list[dict[str, str]]:
    funcs, weights = zip(*GENERATORS, strict=True)
    # Drills use training questions only, facts training cities only, sums skip test pairs.
    return [{"text": rng.choices(funcs, weights)[0](rng, world)} for _ in range(CORPUS_DOCS)]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records)


def generate(out: Path, seed: int = SEED) -> None:
    rng = random.Random(seed)
    cities = city_names(rng, 240)
    train, test = split_qa(rng, cities)
    held_out = frozenset(r["input"] for r in test)
    countries = ["Norland", "Estavia", "Morvia", "Sudera", "Westmark", "Caldor"]
    facts = {c: countries[i % len(countries)] for i, c in enumerate(cities)
             if f"What colour is the sky in {c}?" not in held_out}
    corpus = make_corpus(rng, World(facts, train, held_out))
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "tiny_corpus.jsonl", corpus)
    write_jsonl(out / "qa_train.jsonl", train)
    write_jsonl(out / "qa_test.jsonl", test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    generate(args.out, args.seed)


if __name__ == "__main__":
    main()
