"""A synthetic catalogue with realistic skew, in the bring-your-own format (data/FORMAT.md).

What makes it realistic enough to time the data pipeline on:

- item popularity is Zipf-like (weight of the item of popularity rank r is 1 / r^a, a = 1.05):
  a few items take most interactions and most items sit in a long tail;
- user activity is long-tailed too (Pareto weights): most users have a handful of
  interactions, a few have thousands;
- items belong to topics; each user has a favourite topic and takes 75% of their
  interactions from it (the rest from anywhere), so co-occurrence has structure to find;
- each item has a title made of words of its topic (so text similarity follows topics),
  one or two categories ("topic|subtopic"), and a price (lognormal, 5% missing).

Everything is vectorised: 10,000,000 interactions take a few seconds to draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ADJECTIVES = [
    "red",
    "blue",
    "green",
    "black",
    "white",
    "silver",
    "golden",
    "wooden",
    "compact",
    "deluxe",
    "classic",
    "modern",
    "vintage",
    "smart",
    "portable",
    "wireless",
    "organic",
    "premium",
    "mini",
    "ultra",
]
TOPIC_NOUNS = {
    "kitchen": ["pan", "kettle", "knife", "blender", "toaster", "mug", "skillet", "grater"],
    "garden": ["hose", "rake", "shovel", "planter", "sprinkler", "pruner", "trowel", "seeds"],
    "audio": ["headphones", "speaker", "amplifier", "turntable", "microphone", "earbuds", "soundbar", "receiver"],
    "books": ["novel", "cookbook", "atlas", "biography", "anthology", "thriller", "memoir", "handbook"],
    "toys": ["puzzle", "robot", "doll", "kite", "blocks", "racecar", "teddy", "yo-yo"],
    "sports": ["ball", "racket", "helmet", "gloves", "skates", "bicycle", "dumbbell", "mat"],
    "office": ["stapler", "notebook", "pen", "lamp", "chair", "desk", "binder", "shredder"],
    "beauty": ["lipstick", "serum", "shampoo", "perfume", "brush", "lotion", "mascara", "soap"],
    "tools": ["drill", "hammer", "wrench", "saw", "pliers", "ladder", "screwdriver", "level"],
    "games": ["console", "controller", "chess", "cards", "dice", "boardgame", "joystick", "headset"],
}
SUBTOPICS = ("budget", "premium", "kids", "pro", "eco", "travel")


@dataclass(frozen=True)
class SynthConfig:
    items: int = 100_000
    interactions: int = 1_000_000
    users: int | None = None  # default: interactions / 20 (at least 10)
    item_skew: float = 1.05  # Zipf exponent of item popularity
    user_skew: float = 1.2  # Pareto shape of user activity (smaller: heavier tail)
    topic_loyalty: float = 0.75  # share of a user's interactions from their favourite topic
    seed: int = 0

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(10, self.interactions // 20)


def _draw_in_topics(
    rng: np.random.Generator, topics: np.ndarray, weights: np.ndarray, wanted: np.ndarray, n_topics: int
) -> np.ndarray:
    """For each entry of ``wanted`` (a topic), an item of that topic drawn by ``weights``."""
    order = np.argsort(topics, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(weights[order])])
    bounds = np.searchsorted(topics[order], np.arange(n_topics + 1))  # items of topic t: order[bounds[t]:bounds[t+1]]
    lo, hi = cum[bounds[wanted]], cum[bounds[wanted + 1]]
    u = lo + rng.random(len(wanted)) * (hi - lo)
    pos = np.searchsorted(cum, u, side="right") - 1
    pos = np.clip(pos, bounds[wanted], bounds[wanted + 1] - 1)
    return order[pos]


def synthetic_catalogue(cfg: SynthConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) frames with the columns of items.csv and interactions.csv."""
    if cfg.items < 2 or cfg.interactions < 2:
        raise ValueError("need at least 2 items and 2 interactions")
    rng = np.random.default_rng(cfg.seed)
    names = list(TOPIC_NOUNS)
    n_topics = len(names)
    n, m, u = cfg.items, cfg.interactions, cfg.n_users

    topic = rng.integers(0, n_topics, n)
    rank = rng.permutation(n) + 1
    pop = 1.0 / rank.astype(np.float64) ** cfg.item_skew
    user_topic = rng.integers(0, n_topics, u)
    activity = rng.pareto(cfg.user_skew, u) + 1.0
    users = rng.choice(u, size=m, p=activity / activity.sum())
    loyal = rng.random(m) < cfg.topic_loyalty
    wanted = np.where(
        loyal, user_topic[users], rng.choice(n_topics, size=m, p=np.bincount(topic, minlength=n_topics) / n)
    )
    wanted = np.where(np.bincount(topic, minlength=n_topics)[wanted] > 0, wanted, topic[0])
    items = _draw_in_topics(rng, topic, pop, wanted, n_topics)
    timestamps = np.sort(1_600_000_000 + rng.integers(0, 365 * 86_400, m))
    ratings = np.clip(np.round(rng.normal(3.6, 1.1, m)), 1, 5).astype(np.int8)
    interactions = pd.DataFrame(
        {
            "user_id": pd.Series(users).map("u{}".format),
            "item_id": pd.Series(items).map("i{}".format),
            "rating": ratings,
            "timestamp": timestamps,
        }
    )

    adj = np.array(ADJECTIVES, dtype=object)[rng.integers(0, len(ADJECTIVES), n)]
    noun_idx = rng.integers(0, 8, n)
    nouns = np.array([TOPIC_NOUNS[names[t]][k] for t, k in zip(topic, noun_idx)], dtype=object)
    sub = rng.integers(0, len(SUBTOPICS), n)
    has_sub = rng.random(n) < 0.6
    topic_names = np.array(names, dtype=object)[topic]
    categories = np.where(has_sub, topic_names + "|" + np.array(SUBTOPICS, dtype=object)[sub], topic_names)
    price = np.round(np.exp(rng.normal(3.0, 1.0, n)), 2)
    price_col = pd.Series(price).where(rng.random(n) >= 0.05)
    items_df = pd.DataFrame(
        {
            "item_id": pd.Series(np.arange(n)).map("i{}".format),
            "title": adj + " " + nouns + " " + pd.Series(np.arange(n)).map("model {}".format).to_numpy(object),
            "categories": categories,
            "price": price_col,
        }
    )
    return items_df, interactions


def write_catalogue(cfg: SynthConfig, root: Path) -> Path:
    """Write the catalogue as ``root/items.csv`` and ``root/interactions.csv``; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    items, interactions = synthetic_catalogue(cfg)
    items.to_csv(root / "items.csv", index=False)
    interactions.to_csv(root / "interactions.csv", index=False)
    return root
