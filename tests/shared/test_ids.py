"""Generation ids carry their creation time, so an expired one is told from an unknown one."""

from __future__ import annotations

import re

from tokenrelay.shared import ids

NOW = 1_796_000_000.0


def test_a_new_id_carries_its_time_and_128_random_bits() -> None:
    """`gen_` + 12 hex digits of ms since the epoch + 32 random hex digits; never twice alike."""
    made = {ids.new_generation_id(NOW) for _ in range(1000)}
    assert len(made) == 1000
    for gen_id in made:
        assert re.fullmatch(r"gen_[0-9a-f]{44}", gen_id)
        assert ids.is_generation_id(gen_id)
        assert ids.created_ms(gen_id) == int(NOW * 1000)


def test_old_format_ids_stay_valid_but_have_no_time() -> None:
    """Ids made before the time was added are still ids; missing, they are unknown (404)."""
    old = "gen_" + "ab" * 16
    assert ids.is_generation_id(old)
    assert ids.created_ms(old) is None
    assert not ids.past_retention(old, 1, now=NOW + 10**9)


def test_malformed_ids_are_refused() -> None:
    for bad in ("", "gen_", "gen_" + "a" * 31, "gen_" + "a" * 33, "gen_" + "a" * 45,
                "gen_" + "A" * 32, "thr_" + "a" * 32, "gen_" + "a" * 44 + "\n"):
        assert not ids.is_generation_id(bad), bad
        assert ids.created_ms(bad) is None


def test_past_retention_only_once_creation_plus_retention_has_passed() -> None:
    gen_id = ids.new_generation_id(NOW)
    assert not ids.past_retention(gen_id, 60, now=NOW)
    assert not ids.past_retention(gen_id, 60, now=NOW + 59.9)
    assert ids.past_retention(gen_id, 60, now=NOW + 60.1)
    assert not ids.past_retention(ids.new_generation_id(NOW + 3600), 60, now=NOW)  # the future
