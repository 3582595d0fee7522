"""Preference tasks with a known answer, generated locally: for the demo and the tests.

Each returns rows {prompt, chosen, rejected} where chosen follows the rule and rejected breaks it,
so held-out reward accuracy measures whether DPO learned the rule (chance is 0.5).
"""

from __future__ import annotations

import random


def parity_pairs(n: int, seed: int = 0, digits: int = 3) -> list:
    """"number 4 7 2 is" -> chosen " even", rejected " odd" (the last digit decides)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        number = [str(rng.randrange(10)) for _ in range(digits)]
        even = int(number[-1]) % 2 == 0
        right, wrong = ("even", "odd") if even else ("odd", "even")
        rows.append({"prompt": f"number {' '.join(number)} is", "chosen": f" {right}", "rejected": f" {wrong}"})
    return rows


def arithmetic_pairs(n: int, seed: int = 0) -> list:
    """"What is 23 + 45? Answer with the number only." -> chosen "68", rejected a near miss."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        wrong = a + b + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
        rows.append({"prompt": f"What is {a} + {b}? Answer with the number only.",
                     "chosen": str(a + b), "rejected": str(wrong)})
    return rows


def split(rows: list, held_out: float = 0.2):
    cut = int(len(rows) * (1 - held_out))
    return rows[:cut], rows[cut:]
