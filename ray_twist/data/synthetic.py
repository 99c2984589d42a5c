"""The synthetic style world: seeded parallel data for rule-based styles, with checkers.

Tests, benchmarks and the offline demo need style tasks whose ground truth is known
exactly, without third-party text. Neutral sentences come from a small grammar over our
own word lists (plain lowercase English, 6–14 words). Each style rewrites a sentence
token by token, deterministically:

* every style belongs to a **family** whose word map it applies in full — siblings share
  all their rewriting rules, so a held-out family member is learnable faster from its
  siblings' LoRAs than from scratch (the transfer TWIST relies on);
* families use **disjoint** word maps (no word is rewritten by two families);
* each style adds one **marker** of its own: a prefix, a suffix before the final
  punctuation, or a replaced final punctuation mark.

Every neutral sentence contains at least one word from every family's map, so every
style visibly changes every sentence. `check_style` accepts a text when it carries the
style's marker, no other style's marker, and none of the family's unrewritten words.

    family    style          marker
    archaic   shakespearean  suffix ", forsooth"   you→thou, your→thy, are→art, has→hath…
              biblical       prefix "and lo,"
    nautical  pirate         prefix "arr,"         my→me, friend→matey, is→be, hello→ahoy…
              sailor         suffix ", aye"
    register  formal         prefix "furthermore,"  want→wish, buy→purchase, help→assist…
              polite         suffix ", please"
    emphasis  shouty         final "!"             small→tiny, big→huge, good→great…
              emphatic       prefix "honestly,"
"""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ray_twist import storage
from ray_twist.data.task import Task

Position = Literal["prefix", "suffix", "ending"]


@dataclass(frozen=True)
class Style:
    """A rule-based style: its family's word map plus a marker at `position`."""

    name: str
    family: str
    description: str
    marker: str
    position: Position


FAMILY_RULES: dict[str, dict[str, str]] = {
    "archaic": {
        "you": "thou",
        "your": "thy",
        "are": "art",
        "has": "hath",
        "does": "doth",
        "often": "oft",
        "before": "ere",
    },
    "nautical": {
        "my": "me",
        "friend": "matey",
        "is": "be",
        "hello": "ahoy",
        "money": "treasure",
        "drink": "grog",
    },
    "register": {
        "want": "wish",
        "wants": "wishes",
        "buy": "purchase",
        "buys": "purchases",
        "help": "assist",
        "helps": "assists",
        "get": "obtain",
        "gets": "obtains",
        "need": "require",
        "needs": "requires",
        "show": "demonstrate",
        "shows": "demonstrates",
        "about": "regarding",
    },
    "emphasis": {
        "small": "tiny",
        "big": "huge",
        "good": "great",
        "bad": "awful",
        "old": "ancient",
        "happy": "thrilled",
        "cold": "freezing",
        "tired": "exhausted",
        "nice": "lovely",
        "hungry": "starving",
        "quiet": "silent",
        "dirty": "filthy",
    },
}

STYLES: dict[str, Style] = {
    s.name: s
    for s in [
        Style("shakespearean", "archaic", "old words, ends ', forsooth'", ", forsooth", "suffix"),
        Style("biblical", "archaic", "old words, opens 'and lo,'", "and lo,", "prefix"),
        Style("pirate", "nautical", "sea talk, opens 'arr,'", "arr,", "prefix"),
        Style("sailor", "nautical", "sea talk, ends ', aye'", ", aye", "suffix"),
        Style("formal", "register", "formal words, opens 'furthermore,'", "furthermore,", "prefix"),
        Style("polite", "register", "formal words, ends ', please'", ", please", "suffix"),
        Style("shouty", "emphasis", "strong words, ends '!'", "!", "ending"),
        Style("emphatic", "emphasis", "strong words, opens 'honestly,'", "honestly,", "prefix"),
    ]
}

_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
_FINAL = {".", "!", "?"}
_NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":"}

# The neutral grammar. Subjects carry their person: 2 = "you", 3 = third singular.
_SUBJECTS = [
    ("you", 2),
    ("your friend", 3),
    ("my friend", 3),
    ("your sister", 3),
    ("my brother", 3),
    ("my cousin", 3),
    ("your uncle", 3),
    ("my neighbour", 3),
    ("the captain", 3),
    ("the old farmer", 3),
    ("the teacher", 3),
    ("our baker", 3),
]
_WANTS = ["want", "need", "hope", "plan"]
_ACTIONS = ["buy", "get", "show", "help", "sell", "find", "paint", "bring", "clean", "keep"]
_PERSON_ADJECTIVES = ["happy", "tired", "hungry", "cold", "quiet", "good", "nice"]
_THING_ADJECTIVES = ["small", "big", "good", "bad", "old", "cold", "nice", "dirty", "quiet"]
_DETERMINERS = ["my", "your", "the", "our", "this", "that"]
_NOUNS = [
    "boat",
    "house",
    "map",
    "money",
    "book",
    "horse",
    "lamp",
    "coat",
    "dog",
    "garden",
    "letter",
    "key",
    "basket",
    "drink",
    "bell",
    "cart",
    "rope",
    "window",
    "chair",
    "table",
    "lantern",
    "kettle",
    "blanket",
    "wagon",
    "goat",
    "barrel",
    "flag",
    "ladder",
    "bucket",
    "drum",
]
_RECIPIENTS = ["my friend", "your family", "the children", "my mother", "your guests", "the king"]
_PLACES = [
    "near the river",
    "in the village",
    "at the market",
    "by the sea",
    "on the hill",
    "behind the mill",
    "at the harbour",
    "in the forest",
    "under the bridge",
    "next to the church",
    "at the inn",
    "across the field",
]
_TIMES = [
    "before dinner",
    "before the storm",
    "before sunrise",
    "every morning",
    "tonight",
    "after the rain",
    "on sunday",
    "this week",
    "at noon",
]
_OPENERS = ["hello", "well", "today", "sadly", "luckily", "so"]


def families() -> dict[str, list[str]]:
    """Family name → its styles, in definition order."""
    out: dict[str, list[str]] = {}
    for style in STYLES.values():
        out.setdefault(style.family, []).append(style.name)
    return out


def neutral_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct neutral sentences, each containing a word of every family's map."""
    rng = random.Random(seed)
    found: dict[str, None] = {}
    attempts = 0
    while len(found) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct neutral sentences")
        sentence = _sentence(rng)
        tokens = _tokens(sentence)
        n_words = sum(t[0].isalpha() for t in tokens)
        if 6 <= n_words <= 14 and all(set(tokens) & r.keys() for r in FAMILY_RULES.values()):
            found[sentence] = None
    return list(found)


def apply_style(style: str, sentence: str) -> str:
    """`sentence` rewritten in `style` (lowercased; family word map, then the marker)."""
    spec = _style(style)
    rules = FAMILY_RULES[spec.family]
    tokens = [rules.get(t, t) for t in _tokens(sentence)]
    marker = _tokens(spec.marker)
    final = [tokens.pop()] if tokens and tokens[-1] in _FINAL else []
    if spec.position == "prefix":
        tokens = marker + tokens + final
    elif spec.position == "suffix":
        tokens = tokens + marker + final
    else:
        tokens = tokens + marker
    return _detokenize(tokens)


def check_style(style: str, text: str) -> bool:
    """True when `text` is in `style`: its marker, no other style's marker, and none of
    the family's words left unrewritten. Spacing and case are ignored."""
    spec = _style(style)
    tokens = _tokens(text)
    if not _has_marker(spec, tokens):
        return False
    if any(_has_marker(other, tokens) for other in STYLES.values() if other.name != style):
        return False
    return not set(tokens) & FAMILY_RULES[spec.family].keys()


def make_task(style: str, n: int, seed: int = 0, split: str = "train") -> Task:
    """`n` neutral → `style` pairs. Each style draws its own sentences for a given seed;
    other seeds rarely repeat a sentence, `Task.split_off` guarantees disjoint splits."""
    _style(style)
    sources = neutral_sentences(n, seed=_mix(seed, style))
    return Task(
        name=style, sources=sources, targets=[apply_style(style, s) for s in sources], split=split
    )


def make_world(n_per_style: int, seed: int = 0, styles: list[str] | None = None) -> dict[str, Task]:
    """A task per style (all styles by default), keyed by style name."""
    return {s: make_task(s, n_per_style, seed=seed) for s in (styles or list(STYLES))}


def style_corpus(n_per_style: int, seed: int = 0) -> list[tuple[str, str]]:
    """Shuffled (text, label) pairs for training a style classifier; label "neutral" is
    unstyled text. Drawn apart from `make_task(..., seed)`, so evaluation texts are unseen."""
    own_seed = _mix(seed, "style_corpus")
    corpus = [
        (s, "neutral") for s in neutral_sentences(n_per_style, seed=_mix(own_seed, "neutral"))
    ]
    for name in STYLES:
        corpus += [(t, name) for t in make_task(name, n_per_style, seed=own_seed).targets]
    random.Random(seed).shuffle(corpus)
    return corpus


def write_task_jsonl(task: Task, path: str | Path) -> str:
    """Write `task` as JSON Lines with source/target (and references) fields; returns the URI."""
    lines = []
    for i, (source, target) in enumerate(task.pairs):
        record: dict[str, object] = {"source": source, "target": target}
        if task.references is not None:
            record["references"] = task.references[i]
        lines.append(json.dumps(record, ensure_ascii=False))
    uri = str(path)
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    return uri


def _style(name: str) -> Style:
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; known styles: {', '.join(STYLES)}")
    return STYLES[name]


def _mix(seed: int, label: str) -> int:
    """A stable per-label seed (not Python's randomised hash)."""
    return zlib.crc32(f"{seed}:{label}".encode())


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _detokenize(tokens: list[str]) -> str:
    out = ""
    for token in tokens:
        out += token if (token in _NO_SPACE_BEFORE and out) else (" " if out else "") + token
    return out


def _has_marker(style: Style, tokens: list[str]) -> bool:
    marker = _tokens(style.marker)
    if style.position == "prefix":
        return tokens[: len(marker)] == marker
    if style.position == "ending":
        return tokens[-len(marker) :] == marker
    body = tokens[:-1] if tokens and tokens[-1] in _FINAL else tokens
    return body[-len(marker) :] == marker


def _object(rng: random.Random) -> str:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.75:
        words.append(rng.choice(_THING_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    return " ".join(words)


def _verb(base: str, person: int) -> str:
    return base + "s" if person == 3 else base


def _sentence(rng: random.Random) -> str:
    subject, person = rng.choice(_SUBJECTS)
    be, have, do = ("are", "have", "do") if person == 2 else ("is", "has", "does")
    action, want = rng.choice(_ACTIONS), _verb(rng.choice(_WANTS), person)
    pattern = rng.randrange(6)
    if pattern == 0:
        verb_phrase = f"{want} to {action} {_object(rng)}"
    elif pattern == 1:
        verb_phrase = f"often {_verb(action, person)} {_object(rng)}"
    elif pattern == 2:
        verb_phrase = f"{do} not {action} {_object(rng)}"
    elif pattern == 3:
        verb_phrase = f"{be} {rng.choice(_PERSON_ADJECTIVES)} about {_object(rng)}"
    elif pattern == 4:
        verb_phrase = f"{have} {_object(rng)} and {want} to {action} it"
    else:
        verb_phrase = f"{_verb(action, person)} {_object(rng)} for {rng.choice(_RECIPIENTS)}"
    parts = [subject, verb_phrase]
    if rng.random() < 0.5:
        parts.append(rng.choice(_PLACES))
    if rng.random() < 0.4:
        parts.append(rng.choice(_TIMES))
    if rng.random() < 0.4:
        parts.insert(0, rng.choice(_OPENERS) + ",")
    return " ".join(parts) + "."
