"""Write fables.txt: short generated fables, one paragraph each, from a fixed seed.

The text is made by this script from the word lists below (no source text is copied), so
the corpus is the project's own, under its licence (Apache-2.0). Run from anywhere:

    python data/corpus/make_corpus.py            # rewrites data/corpus/fables.txt
"""

from __future__ import annotations

import random
from pathlib import Path

ANIMALS = ["fox", "crow", "hare", "tortoise", "wolf", "lamb", "lion", "mouse", "ant", "owl"]
TRAITS = ["clever", "proud", "lazy", "patient", "greedy", "kind", "hungry", "old", "young"]
PLACES = ["by the river", "in the wood", "on the hill", "near the farm", "under the oak"]
FINDS = ["a piece of cheese", "a bag of grain", "a shiny stone", "a ripe pear", "a lost key"]
DEEDS = [
    "tried to take it by a trick",
    "asked to share it",
    "ran to tell the others",
    "hid it under a leaf",
    "waited until the sun went down",
]
ENDINGS = [
    "but the trick was seen, and nothing was won.",
    "and both of them ate well that night.",
    "so the others laughed and went home.",
    "yet by morning it was gone.",
    "and from that day they were friends.",
]
MORALS = [
    "Slow and steady wins the race.",
    "A friend in need is a friend indeed.",
    "Do not count your pears before they are ripe.",
    "Pride comes before a fall.",
    "Little by little does the trick.",
]


def article(word: str) -> str:
    """'an owl', 'a fox'."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def fable(rng: random.Random) -> str:
    """One fable of three or four sentences."""
    a, b = rng.sample(ANIMALS, 2)
    lines = [
        f"Once {article(rng.choice(TRAITS))} {a} lived {rng.choice(PLACES)}.",
        f"One day the {a} found {rng.choice(FINDS)}, and {article(b)} {rng.choice(DEEDS)},",
        rng.choice(ENDINGS),
    ]
    if rng.random() < 0.7:
        lines.append(f"Moral: {rng.choice(MORALS)}")
    return " ".join(lines[:2]) + " " + "\n".join(lines[2:])


def main(n: int = 600, seed: int = 26) -> None:
    rng = random.Random(seed)
    out = Path(__file__).with_name("fables.txt")
    out.write_text("\n\n".join(fable(rng) for _ in range(n)) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
