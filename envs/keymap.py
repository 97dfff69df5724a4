"""Keyboard chords of the discrete env, as data: name, keys held, canonical action.

The canonical action is `(forward, strafe, turn, look)` in [-1, 1] (docs/ARCHITECTURE.md): strafe > 0
moves right, turn > 0 turns left. Keys are pygame key *names* (`pygame.key.key_code(name)` gives the
constant) so that this table never imports pygame. `CHORDS` is ordered longest chord first, which is the
order `chord_index` matches in: holding W and ← is "forward_turn_left", not "forward".
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

# (name, keys, (forward, strafe, turn, look))
_TABLE: tuple[tuple[str, tuple[str, ...], tuple[float, float, float, float]], ...] = (
    ("none", (), (0.0, 0.0, 0.0, 0.0)),
    ("forward", ("w",), (1.0, 0.0, 0.0, 0.0)),
    ("back", ("s",), (-1.0, 0.0, 0.0, 0.0)),
    ("strafe_left", ("a",), (0.0, -1.0, 0.0, 0.0)),
    ("strafe_right", ("d",), (0.0, 1.0, 0.0, 0.0)),
    ("turn_left", ("left",), (0.0, 0.0, 1.0, 0.0)),
    ("turn_right", ("right",), (0.0, 0.0, -1.0, 0.0)),
    ("forward_turn_left", ("w", "left"), (1.0, 0.0, 1.0, 0.0)),
    ("forward_turn_right", ("w", "right"), (1.0, 0.0, -1.0, 0.0)),
    ("forward_strafe_left", ("w", "a"), (1.0, -1.0, 0.0, 0.0)),
    ("forward_strafe_right", ("w", "d"), (1.0, 1.0, 0.0, 0.0)),
    ("back_turn_left", ("s", "left"), (-1.0, 0.0, 1.0, 0.0)),
    ("back_turn_right", ("s", "right"), (-1.0, 0.0, -1.0, 0.0)),
    ("back_strafe_left", ("s", "a"), (-1.0, -1.0, 0.0, 0.0)),
    ("back_strafe_right", ("s", "d"), (-1.0, 1.0, 0.0, 0.0)),
)

ACTION_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _TABLE)
"""Discrete action id -> name; the id is the index into this tuple (stable across versions of v0)."""
ACTION_KEYS: tuple[tuple[str, ...], ...] = tuple(keys for _, keys, _ in _TABLE)
DISCRETE_ACTIONS: np.ndarray = np.array([a for _, _, a in _TABLE], dtype=np.float32)
"""(K, 4) canonical action of each discrete id."""
KEYS: tuple[str, ...] = tuple(sorted({k for keys in ACTION_KEYS for k in keys}))
"""Every key the table uses (pygame key names)."""

CHORDS: tuple[tuple[tuple[str, ...], int], ...] = tuple(
    sorted(((keys, i) for i, keys in enumerate(ACTION_KEYS)), key=lambda c: -len(c[0]))
)
"""(keys, action id), longest chord first: the lookup order for held keys."""


def chord_index(pressed: Collection[str]) -> int:
    """Discrete action id of the longest chord whose keys are all held (0 = none)."""
    held = set(pressed)
    for keys, index in CHORDS:
        if held.issuperset(keys):
            return index
    raise AssertionError("unreachable: the empty chord always matches")


def chord_action(pressed: Collection[str]) -> np.ndarray:
    """Canonical (4,) action of the held keys."""
    return DISCRETE_ACTIONS[chord_index(pressed)].copy()
