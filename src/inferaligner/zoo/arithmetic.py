"""Multi-step arithmetic word problems with exact integer answers: the demo target's domain (the paper's math
domain, in miniature). Problems are generated from templates with a seeded RNG; train and test never overlap."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kira",
    "Liam",
    "Maya",
    "Noor",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
)


@dataclass(frozen=True)
class Problem:
    """A word problem, its worked solution (ending "The answer is N.") and the answer."""

    question: str
    solution: str
    answer: int


def _shop(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(("pencils", "apples", "stickers", "marbles", "cookies", "cards"))
    packs, per, given = r.randint(2, 9), r.randint(3, 12), r.randint(1, 15)
    total = packs * per
    given = min(given, total - 1)
    left = total - given
    return Problem(
        f"{name} buys {packs} packs of {item} with {per} {item} in each pack, then gives away {given}. "
        f"How many {item} does {name} have left?",
        f"{name} buys {packs} x {per} = {total} {item}. After giving away {given}, {total} - {given} = {left}. "
        f"The answer is {left}.",
        left,
    )


def _savings(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    start, weekly, weeks, spent = r.randint(5, 60), r.randint(3, 25), r.randint(2, 10), r.randint(1, 40)
    saved = weekly * weeks
    before = start + saved
    spent = min(spent, before - 1)
    left = before - spent
    return Problem(
        f"{name} has ${start} and saves ${weekly} every week for {weeks} weeks. Then {name} spends ${spent} on a "
        f"gift. How many dollars does {name} have now?",
        f"Savings: {weekly} x {weeks} = {saved}. Total: {start} + {saved} = {before}. After the gift: "
        f"{before} - {spent} = {left}. The answer is {left}.",
        left,
    )


def _garden(r: random.Random) -> Problem:
    rows, per, dead = r.randint(3, 12), r.randint(4, 15), r.randint(1, 9)
    total = rows * per
    dead = min(dead, total - 1)
    alive = total - dead
    return Problem(
        f"A garden has {rows} rows with {per} tulips in each row. {dead} tulips do not bloom. How many tulips bloom?",
        f"There are {rows} x {per} = {total} tulips. {total} - {dead} = {alive} bloom. The answer is {alive}.",
        alive,
    )


def _bus(r: random.Random) -> Problem:
    start, off, on = r.randint(10, 50), r.randint(1, 9), r.randint(2, 20)
    off = min(off, start)
    middle = start - off
    end = middle + on
    return Problem(
        f"A bus has {start} passengers. At the first stop {off} get off and {on} get on. "
        "How many passengers are on the bus now?",
        f"After {off} get off: {start} - {off} = {middle}. After {on} get on: {middle} + {on} = {end}. "
        f"The answer is {end}.",
        end,
    )


def _share(r: random.Random) -> Problem:
    people, each, extra = r.randint(2, 9), r.randint(2, 12), r.randint(1, 10)
    total = people * each + extra
    return Problem(
        f"A teacher has {total} stickers. She gives {each} stickers to each of her {people} students. "
        "How many stickers does she have left?",
        f"She gives away {people} x {each} = {people * each}. {total} - {people * each} = {extra}. "
        f"The answer is {extra}.",
        extra,
    )


def _trip(r: random.Random) -> Problem:
    speed, hours, more = r.randint(20, 80), r.randint(2, 6), r.randint(5, 60)
    first = speed * hours
    total = first + more
    return Problem(
        f"A car drives at {speed} km per hour for {hours} hours and then drives {more} km more. "
        "How many km does it drive in total?",
        f"First part: {speed} x {hours} = {first}. Total: {first} + {more} = {total}. The answer is {total}.",
        total,
    )


def _bake(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    batches, per, eaten, boxes = r.randint(2, 6), r.randint(6, 24), r.randint(1, 10), r.randint(2, 5)
    total = batches * per
    eaten = min(eaten, total - boxes)
    left = total - eaten
    left -= left % boxes
    eaten = total - left
    each = left // boxes
    return Problem(
        f"{name} bakes {batches} batches of {per} muffins. After eating {eaten}, {name} puts the rest equally into "
        f"{boxes} boxes. How many muffins go in each box?",
        f"{batches} x {per} = {total} muffins. {total} - {eaten} = {left}. {left} / {boxes} = {each}. "
        f"The answer is {each}.",
        each,
    )


def _tickets(r: random.Random) -> Problem:
    adults, kids, adult_price, kid_price = r.randint(2, 6), r.randint(2, 8), r.randint(8, 20), r.randint(3, 9)
    cost_a, cost_k = adults * adult_price, kids * kid_price
    total = cost_a + cost_k
    return Problem(
        f"Museum tickets cost ${adult_price} for adults and ${kid_price} for children. A group of {adults} adults "
        f"and {kids} children visits. How much do they pay in total?",
        f"Adults: {adults} x {adult_price} = {cost_a}. Children: {kids} x {kid_price} = {cost_k}. "
        f"Total: {cost_a} + {cost_k} = {total}. The answer is {total}.",
        total,
    )


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _shop, _savings, _garden, _bus, _share, _trip, _bake, _tickets,
)  # fmt: skip

TRAIN_SEED = 1234
TEST_SEED = 98765


def generate_problems(count: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[Problem]:
    """`count` distinct problems, templates taken in turn; questions in `exclude` are skipped."""
    rng = random.Random(seed)
    seen = set(exclude)
    problems: list[Problem] = []
    while len(problems) < count:
        problem = TEMPLATES[len(problems) % len(TEMPLATES)](rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def train_test_split(train: int, test: int) -> tuple[list[Problem], list[Problem]]:
    """Training problems and held-out test problems that share no question."""
    train_set = generate_problems(train, TRAIN_SEED)
    return train_set, generate_problems(test, TEST_SEED, exclude={p.question for p in train_set})


_ANSWER = re.compile(r"answer is\s*\$?\s*(-?[\d,]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*")


def parse_answer(text: str) -> int | None:
    """The number after "The answer is", else the last number in the text, else None."""
    match = _ANSWER.search(text)
    found = match.group(1) if match else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    try:
        return int(found.replace(",", ""))
    except ValueError:
        return None
