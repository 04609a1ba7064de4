"""Write the demo data set: sentences -> strict JSON with the keys the prompt names.

Run from the repository root: `python scripts/make_demo_data.py`. The output is deterministic
(fixed seed), so running it again rewrites the same two files:

- `lora_nb/demo_data/train.jsonl`: 88 extraction examples in three phrasings per record type,
  plus 8 general question/answer pairs ("replay") so that the model keeps answering normally;
- `lora_nb/demo_data/heldout.jsonl`: 30 extraction examples with names never seen in training and
  a fourth phrasing per record type, so the score measures generalisation, not memory.

The JSON conventions are what the model has to learn (the base model gets them wrong): numbers
written as words become integers, common nouns are lower-case and singular, proper names stay as
written, and the keys are exactly the ones the prompt lists, in that order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "lora_nb" / "demo_data"
SEED = 1234

TRAIN_NAMES = [
    "Maria Lopez", "Tom Becker", "Aiko Tanaka", "Liam Walsh", "Sofia Rossi", "Omar Haddad",
    "Nina Petrova", "Lucas Martin", "Emma Schulz", "Ravi Patel", "Chloe Dubois", "Jonas Berg",
    "Ines Costa", "Pavel Novak", "Hannah Kim", "Diego Ruiz", "Freya Olsen", "Samir Khan",
    "Julia Weber", "Marco Bianchi", "Zoe Clarke", "Ali Demir", "Lena Fischer", "Noah Brooks",
]
HELDOUT_NAMES = [
    "Greta Lind", "Kenji Mori", "Paula Vidal", "Felix Grant", "Amara Obi", "Victor Hale",
    "Rosa Méndez", "Ethan Cole", "Mila Horvat", "Arjun Rao", "Clara Moss", "Igor Sokol",
    "Lucia Ferro", "Owen Price", "Yara Nassar",
]
CITIES = ["Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague", "Athens", "Warsaw", "Lyon",
          "Porto", "Zurich", "Helsinki", "Milan", "Krakow", "Seville", "Bergen"]
ITEMS = [("lamp", "lamps"), ("chair", "chairs"), ("mug", "mugs"), ("towel", "towels"),
         ("notebook", "notebooks"), ("pillow", "pillows"), ("candle", "candles"), ("basket", "baskets"),
         ("plate", "plates"), ("scarf", "scarves")]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
JOBS = ["teacher", "nurse", "pilot", "baker", "lawyer", "farmer", "designer", "chemist", "plumber",
        "librarian"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n: int) -> str:
    """0-99 in English words: 7 -> 'seven', 34 -> 'thirty-four'."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


# Each record type: the keys (in prompt order), three training phrasings, one held-out phrasing.
TEMPLATES = {
    "order": {
        "keys": ["customer", "item", "color", "quantity"],
        "train": [
            "{name} ordered {qty} {color} {items}.",
            "Yesterday {name} bought {qty} {color} {items} online.",
            "An order came in from {name}: {qty} {color} {items}.",
        ],
        "heldout": ["Please send {qty} {color} {items} to {name}, who placed the order today."],
    },
    "trip": {
        "keys": ["traveler", "origin", "destination", "bags"],
        "train": [
            "{name} is flying from {origin} to {destination} with {bags} bags.",
            "{name} takes the train from {origin} to {destination} and carries {bags} bags.",
            "Leaving {origin} for {destination}, {name} checked in {bags} bags.",
        ],
        "heldout": ["With {bags} bags in hand, {name} travels to {destination}, starting in {origin}."],
    },
    "person": {
        "keys": ["name", "age", "job", "city"],
        "train": [
            "{name} is a {age}-year-old {job} from {city}.",
            "{name}, aged {age}, works as a {job} in {city}.",
            "Meet {name}: {job}, {age} years old, living in {city}.",
        ],
        "heldout": ["In {city} there is a {job} called {name} who turned {age} this year."],
    },
}

# A few general questions with short answers, mixed into training so that the model does not
# learn to answer everything with JSON.
REPLAY = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey."),
    ("What is 2 plus 3?", "2 plus 3 is 5."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which animal says 'moo'?", "A cow says 'moo'."),
]


def prompt(keys: list[str], sentence: str) -> str:
    """The user turn: the keys to extract, then the sentence."""
    return f"Extract JSON with the keys {', '.join(keys)}.\nSentence: {sentence}"


def make_record(kind: str, name: str, template: str, rng: random.Random) -> dict:
    """One chat example of record type `kind`, filled with random values."""
    keys = TEMPLATES[kind]["keys"]
    if kind == "order":
        item, items = rng.choice(ITEMS)
        qty, color = rng.randint(2, 12), rng.choice(COLORS)
        sentence = template.format(name=name, qty=number_word(qty), color=color, items=items)
        answer = {"customer": name, "item": item, "color": color, "quantity": qty}
    elif kind == "trip":
        origin, destination = rng.sample(CITIES, 2)
        bags = rng.randint(1, 6)
        sentence = template.format(name=name, origin=origin, destination=destination, bags=number_word(bags))
        answer = {"traveler": name, "origin": origin, "destination": destination, "bags": bags}
    else:
        age, job, city = rng.randint(19, 69), rng.choice(JOBS), rng.choice(CITIES)
        sentence = template.format(name=name, age=number_word(age), job=job, city=city)
        answer = {"name": name, "age": age, "job": job, "city": city}
    assert list(answer) == keys
    return {"messages": [
        {"role": "user", "content": prompt(keys, sentence)},
        {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
    ]}


def make_splits(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, heldout) lists of chat examples."""
    rng = random.Random(seed)
    train = []
    for kind, spec in TEMPLATES.items():
        for i in range(30 if kind != "person" else 28):  # 30 + 30 + 28 = 88 extraction examples
            name = TRAIN_NAMES[(i * 7 + len(train)) % len(TRAIN_NAMES)]
            train.append(make_record(kind, name, spec["train"][i % 3], rng))
    train += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
              for q, a in REPLAY]
    rng.shuffle(train)
    heldout = []
    for kind, spec in TEMPLATES.items():
        for i in range(10):
            name = HELDOUT_NAMES[(i + 5 * len(heldout) // 10) % len(HELDOUT_NAMES)]
            heldout.append(make_record(kind, name, spec["heldout"][0], rng))
    rng.shuffle(heldout)
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line, UTF-8, newline-terminated."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    train, heldout = make_splits()
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out examples to {OUT}")


if __name__ == "__main__":
    main()
