"""Small, real pieces for trainer tests and demos: a tiny HMAT config and a learnable synthetic stream.

The synthetic events have a signal HMAT can pick up near-line: an item is liked when its
first code is in the lower half of the codebook, flipped for users of the "contrarian"
group (odd ids) on items whose second code is in the lowest quarter (an eighth of the
events: enough that the profile matters, few enough that a few hundred events teach the
main effect), with a little label noise. A
random-weight warm start scores at chance, so learning shows up in the prequential AUC.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.hmat.model import HMATConfig, hmat_cpu
from trainer.samples import Example

N_CODES = 6
CODEBOOK = 16


def tiny_config() -> HMATConfig:
    """The tiny tokenizer's vocabulary (6 codes of 16) on the CPU preset trunk (tests/serving's model)."""
    return dataclasses.replace(
        hmat_cpu(), n_sid=N_CODES, codebook_size=CODEBOOK, profile_vocab_size=8, max_items=20, max_profile_len=4
    )


def synthetic_examples(
    n: int, n_users: int = 24, n_items: int = 60, seed: int = 0, prefix: str = "ev", max_history: int = 20
) -> list[Example]:
    """``n`` events in time order; each user's history is its earlier events (as the stream would emit)."""
    rng = np.random.default_rng(seed)
    item_codes = rng.integers(0, CODEBOOK, size=(n_items, N_CODES))
    history: dict[int, list[tuple[np.ndarray, int]]] = {}
    out = []
    for k in range(n):
        user = int(rng.integers(n_users))
        item = int(rng.integers(n_items))
        codes = item_codes[item]
        liked = codes[0] < CODEBOOK // 2
        if user % 2 and codes[1] < CODEBOOK // 4:
            liked = not liked
        label = int(liked) if rng.random() > 0.05 else int(not liked)
        past = history.setdefault(user, [])[-max_history:]
        out.append(
            Example(
                user_id=user,
                event_id=f"{prefix}-{k}",
                event_time_ms=1_700_000_000_000 + k,
                item_id=item,
                history_codes=np.asarray([c for c, _ in past], dtype=np.int64).reshape(-1, N_CODES),
                history_actions=np.asarray([a for _, a in past], dtype=np.int64),
                target_codes=codes.astype(np.int64),
                label=label,
            )
        )
        history[user].append((codes, label))
    return out


def profile_of(user_id: int) -> tuple[int, ...]:
    """Two profile tokens: the user's group and a constant (profile vocab 8)."""
    return (user_id % 2, 2)


TOKENIZER = "tok-test-v1"


def warm_model(seed: int = 0):
    """A random-weight tiny HMAT in eval mode (the warm start of tests)."""
    import torch

    from models.hmat.model import HMAT

    torch.manual_seed(seed)
    return HMAT(tiny_config()).eval()


def tiny_trainer(**config):
    """A NearlineTrainer on ``warm_model()`` that learns the synthetic stream within a few hundred
    events (a high learning rate, no moving average, small windows); ``config`` overrides."""
    from trainer.config import TrainerConfig
    from trainer.nearline import NearlineTrainer

    defaults = {"lr": 3e-3, "ema": 0.0, "batch_size": 32, "window": 400, "min_samples": 64, "gate_window": 64}
    return NearlineTrainer(warm_model(), profile_of, TrainerConfig(**(defaults | config)), tokenizer_version=TOKENIZER)


def weights(model) -> dict:
    """A copy of ``model``'s state dict (name -> tensor)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    """Whether two ``weights`` are equal, tensor by tensor."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
