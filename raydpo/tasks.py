"""Preference tasks with a known answer, generated locally: for the demo and the tests.

Each returns rows {prompt, chosen, rejected} where chosen follows the rule and rejected breaks it,
so held-out reward accuracy measures whether DPO learned the rule (chance is 0.5).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

COLOURS = ("red", "green", "blue")


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


WORDS = """apple river garden window silver forest candle orange pencil rabbit mountain bottle jacket lemon
island dragon castle summer winter button carpet doctor engine farmer guitar hammer kitten ladder market
needle ocean pepper planet rocket saddle tiger violin wallet yellow zebra anchor basket cookie desert
feather glove harbor jungle kettle lantern meadow napkin oyster parrot quilt ribbon shadow tunnel umbrella
valley walnut blanket camera dolphin eagle falcon giraffe helmet iceberg jigsaw koala lizard magnet nickel
orchid panda quartz raven salmon turtle velvet whistle anthem bamboo cactus daisy emerald fossil glacier
hazel igloo jasmine kayak lotus marble nectar olive pebble radish sapphire tulip unicorn vortex willow
yogurt zipper acorn beacon cobalt domino""".split()


def letter_case_pairs(n: int, seed: int = 0) -> list:
    """Conversational rows: 'Write the word "tiger" in uppercase letters, and nothing else.' -> chosen
    "TIGER", rejected "tiger" (and the other way round for lowercase, half of the rows). The answer
    depends on the instruction, so a policy that merely favours one case gets half the pairs right."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word, upper = rng.choice(WORDS), rng.random() < 0.5
        right, wrong = (word.upper(), word.lower()) if upper else (word.lower(), word.upper())
        instruction = f'Write the word "{word}" in {"uppercase" if upper else "lowercase"} letters, and nothing else.'
        rows.append({"prompt": [{"role": "user", "content": instruction}],
                     "chosen": [{"role": "assistant", "content": right}],
                     "rejected": [{"role": "assistant", "content": wrong}]})
    return rows


@dataclass(frozen=True)
class DemoTask:
    """`make demo`'s task and the settings measured to learn it (README: make demo)."""
    name: str
    description: str
    pairs: Callable[..., list]  # (n, seed) -> rows
    steps: int
    batch_size: int  # pairs per worker per step
    learning_rate: float
    eval_steps: int
    sft_weight: float  # weight of TRL's "sft" loss (the chosen answer's NLL) beside "sigmoid"; 0: plain DPO


# SmolLM2-135M-Instruct prefers the chosen case on ~70% of held-out pairs before training, but its greedy
# answer is a chatty sentence, never the bare word. Plain DPO ("sigmoid" alone) reached reward accuracy
# 1.0 and still broke generation: it pushed the rejected spelling down until the greedy answer to an
# uppercase prompt was neither spelling ("KOALA" -> "MYAZZLAM", "YELLOW" -> "MYUFLAY"; 32 of 60 held-out
# answers right, none in uppercase). TRL's "sft" term beside "sigmoid" (the RPO recipe, weights 1 and 1)
# keeps the chosen answer likely: 45 of 60 right (README: make demo). The former demo task,
# arithmetic_pairs, sits near chance (0.58) and DPO did not teach it in a few minutes.
DEMO_TASK = DemoTask(name="letter-case", description="follow an uppercase/lowercase instruction",
                     pairs=letter_case_pairs, steps=12, batch_size=8, learning_rate=3e-5, eval_steps=3,
                     sft_weight=1.0)


def colour_image(colour: str, size=(20, 24)):
    """A PIL image of one solid colour (red, green or blue)."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((*size, 3), np.uint8)
    pixels[..., COLOURS.index(colour)] = 255
    return Image.fromarray(pixels)


def colour_pairs(n: int, seed: int = 0, conversational: bool = True) -> list:
    """Vision rows: an image of one colour, "what colour is this image ?" -> chosen names its colour,
    rejected another one. Conversational rows carry `images` (a list); standard ones `image` and an
    `<image>` placeholder in the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        right, wrong = rng.sample(COLOURS, 2)
        if conversational:
            rows.append({"images": [colour_image(right)],
                         "prompt": [{"role": "user", "content": "what colour is this image ?"}],
                         "chosen": [{"role": "assistant", "content": f"it is {right}"}],
                         "rejected": [{"role": "assistant", "content": f"it is {wrong}"}]})
        else:
            rows.append({"image": colour_image(right), "prompt": "<image> what colour is this image ?",
                         "chosen": f" it is {right}", "rejected": f" it is {wrong}"})
    return rows


def split(rows: list, held_out: float = 0.2):
    cut = int(len(rows) * (1 - held_out))
    return rows[:cut], rows[cut:]
