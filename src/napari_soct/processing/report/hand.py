"""Pairs decided by hand (issue 9) in the quality report.

In the Slice alignment widget a user sets a pair's transform by hand (``manual = 1`` in
``pairwise_registration.csv``, the automatic result kept in ``auto_*`` columns) or marks its automatic result as
checked (``verified = 1``). Such a pair is the user's decision, and the report treats it so:

- The checks of the automatic registration (declared with ``by_hand=True`` in
  :data:`~napari_soct.processing.report.checks.CHECKS`) are no problems on such a row: step 12's NCC after
  registration, NCC gain, confidence, identity fallback, failure, translation, rotation, z-match distance and
  z-match NCC, and step 14's z-overlap distance, NCC and outlier replacement of a pair whose z came from such a
  row. Their failing values are listed as OK with the note ``"set by hand"``, ``"verified by hand"`` or ``"set and
  verified by hand"`` (kept, not hidden: the automatic numbers are still worth seeing), and the rows decided by
  hand are counted apart in the summary. The spread of the z-matches (step 14) leaves those pairs out.
- Stacking's ``transform_skipped`` is no problem for a verified pair whose transform is the identity (a verified
  identity fallback: the user agreed that the slice stays where the stage put it). It stays a warning, with the
  hand decision added to its reason, for a hand-set pair that stacking skipped (status ``error``) and for a
  verified pair with a real transform that the confidence gate dropped: the volume is then not what the user
  decided (set the pair by hand to force it in). Stacking applies a hand-set pair at confidence 1 (its decisions
  row says ``reason = manual``), so it raises none of the automatic checks.
- New warnings, about what the user cannot see in the widget:

  * ``hand_not_applied``: stacking changed a hand-set transform (``apply_rotation_only``, e.g. the conservative
    profile, dropped its translation, or ``max_rotation_deg`` clamped its rotation), or the table changed after
    stacking (a pair set by hand, or reset to automatic, since: the volume does not show it; restack);
  * ``hand_ncc_loss``: the hand-set transform matches the overlap clearly worse than the automatic one did.

- Motor-only stacking (``registration_csv`` empty) used no decision of the user: its rows are checked as usual.

Hand-set against automatic NCC
------------------------------
A careful user wants to hear about a hand alignment that is clearly worse than what the machine found (a nudge
that slipped, the wrong z plane), but not about every deliberate override. The table cannot tell: the
automatic ``ncc_after`` (step 12) is measured on band-passed, smoothed full-resolution planes over a centre ROI,
the hand-set row's (the widget) on the plain overlap view at the reduced level it shows, so the same transform
scores differently (the well registered pairs of the field phantom of ``tests/test_report_by_hand.py`` with
speckle of 50 looks: 0.86-0.89 in step 12, 0.40-0.53 in the widget), so comparing them would flag nearly every
hand-set pair. So both transforms are measured again here the widget's way (the ``overlap`` view: the mean of
the moving slice's first :data:`OVERLAP_PLANES` planes against the fixed slice's planes from the pair's
``z_match_plane``, at the pyramid level of at most :data:`MEASURE_MAX_PX` pixels, NCC over the pixels where both
have data), which is what the user saw when switching between automatic and hand-set: ``hand_ncc_loss =
automatic - hand-set`` is a warning above 0.1. On that phantom a correct alignment that slips by 1, 2, 3, 4
pixels loses 0.02, 0.06-0.08, 0.14-0.15, 0.20-0.23 with 50 looks (0.03-0.06, 0.12-0.19, 0.23-0.38, 0.35-0.57
with 1000 looks): a slip of 3 pixels warns at either speckle level (of 2 where the speckle is low), a 1-pixel
difference of taste does not. The NCC also weighs the tissue outline, so an override made on inner structure may
legitimately score lower: a pair both set and verified by hand is the user's double-checked
decision and is not checked (nor is a manual row whose automatic result was not kept).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..stack.manual import SliceImages, overlap_ncc, read_alignment_table
from ..stack.transforms import PairTransform, read_pairwise_registration

__all__ = ["HAND_SET", "VERIFIED", "SET_AND_VERIFIED", "OVERLAP_PLANES", "MEASURE_MAX_PX", "hand_note",
           "mark_hand_decided", "overlap_view_ncc", "hand_summary"]

HAND_SET, VERIFIED, SET_AND_VERIFIED = "set by hand", "verified by hand", "set and verified by hand"
#: The Slice alignment widget's defaults (``open_alignment``): the NCC the user saw.
OVERLAP_PLANES = 6
MEASURE_MAX_PX = 1024
#: Stacking decisions counted in step 14's summary.
PLACED_BY_HAND = "slice(s) placed by a hand-set transform"
_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError)


def hand_note(manual, verified) -> str:
    """The note of a pair decided by hand (``""`` when it was not)."""
    if manual and verified:
        return SET_AND_VERIFIED
    return HAND_SET if manual else VERIFIED if verified else ""


def hand_summary(counts: dict[str, int]) -> str:
    """``"2 pairs set by hand, 1 pair verified by hand"`` from a record's ``hand_counts``."""
    parts = []
    for note, n in counts.items():
        if not n:
            continue
        if note == PLACED_BY_HAND:
            parts.append(f"{n} {note}")
        else:
            parts.append(f"{n} pair{'s' if n != 1 else ''} {note}")
    return ", ".join(parts)


def overlap_view_ncc(images: SliceImages, pair: PairTransform, planes: int = OVERLAP_PLANES) -> float:
    """NCC of a pair on the widget's ``overlap`` view at the pair's own ``z_match_plane`` (NaN: too little data)."""
    z = int(pair.z_match_plane)
    fixed = images.planes_mean(pair.fixed_id, z, z + planes)
    moving = images.planes_mean(pair.moving_id, 0, planes)
    return overlap_ncc(fixed, moving, pair, factor=images.factor)


def mark_hand_decided(records: dict) -> None:
    """Annotate the rows of steps 12 and 14 decided by hand (see the module docstring).

    Sets ``_by_hand`` (the note) on pairs (step 12), z-matches and decisions (step 14); ``hand_view_ncc``,
    ``auto_view_ncc`` and ``hand_ncc_loss`` on hand-set pairs; ``_hand_not_applied`` on decisions; each record's
    ``hand_counts``; and recomputes the z-match spread of step 14 without the pairs decided by hand. A file that
    cannot be read becomes a note of its step, never an exception.

    Parameters
    ----------
    records : dict
        ``{step key: StepRecord}`` of :func:`~napari_soct.processing.report.collect.collect_run`.
    """
    register, stack = records["register"], records["stack"]
    rows = register.tables.get("pairs", []) if register.ran else []
    for row in rows:
        note = row.get("_by_hand") or ""
        if note:
            register.hand_counts[note] = register.hand_counts.get(note, 0) + 1
    if any(r.get("manual") for r in rows):
        try:
            _measure_hand_set(register, rows, records)
        except _ERRORS as err:
            register.notes.append(f"pairs set by hand not measured again (no hand_ncc_loss check): "
                                  f"{type(err).__name__}: {err}")
    if stack.ran and (stack.tables.get("zmatches") or stack.tables.get("decisions")):
        _mark_stack(stack, register)


def _slice_files(records: dict) -> dict[int, Path]:
    """The slices step 12 registered (its metrics), else those of steps 10 and 11."""
    files = {sid: p for sid, p in records["register"].files.get("registered_slices", {}).items() if p.exists()}
    if not files:
        for key in ("common-space", "interpolate"):
            files.update(records[key].files.get("slices", {}) if records[key].ran else {})
    return files


def _measure_hand_set(register, rows: list[dict], records: dict) -> None:
    pairs, automatic = read_alignment_table(register.files["table"])
    by_key = {(p.fixed_id, p.moving_id): p for p in pairs if p.manual}
    files = _slice_files(records)
    wanted = sorted({sid for key in by_key for sid in key})
    missing = [sid for sid in wanted if sid not in files]
    if missing:
        register.notes.append(f"pairs set by hand not measured again: slice(s) {', '.join(map(str, missing))} not "
                              "found (the common-space folder of step 10)")
        return
    images = SliceImages({sid: files[sid] for sid in wanted}, MEASURE_MAX_PX)
    for row in rows:
        key = (row["fixed_id"], row["moving_id"])
        pair = by_key.get(key)
        if pair is None:
            continue
        auto = automatic.get(key)
        row["hand_view_ncc"] = hand = overlap_view_ncc(images, pair)
        if auto is None:
            continue
        row["auto_status"], row["auto_confidence"] = auto.status, auto.confidence
        row["auto_view_ncc"] = machine = overlap_view_ncc(images, auto)
        if not row.get("verified") and math.isfinite(hand) and math.isfinite(machine):
            row["hand_ncc_loss"] = machine - hand


def _used_pairs(stack, register) -> dict:
    """The pair transforms to hold stacking's decisions against, by ``(fixed_id, moving_id)``: none for motor-only
    stacking; else the reconstruction's own table (step 12's, the one the Slice alignment widget edits: what the
    user decided now, even when the folder was copied and the path stacking recorded points to the original),
    or the table stacking recorded when step 12 is not in the run."""
    recorded = stack.raw.get("registration_csv")
    if recorded == "":
        return {}  # motor-only
    if register.ran and register.tables.get("pairs"):
        return {(row["fixed_id"], row["moving_id"]): PairTransform(
            row["fixed_id"], row["moving_id"], z_match_plane=row["z_match_plane"], tx_px=row["tx_px"],
            ty_px=row["ty_px"], rotation_deg=row["rotation_deg"], manual=bool(row["manual"]),
            verified=bool(row["verified"])) for row in register.tables["pairs"]}
    if recorded and Path(recorded).is_file():
        try:
            return {(p.fixed_id, p.moving_id): p for p in read_pairwise_registration(recorded)}
        except _ERRORS as err:
            stack.notes.append(f"cannot read the registration stacking used ({recorded}): {err}")
    return {}


def _mark_stack(stack, register) -> None:
    from .collect import z_spread

    used = _used_pairs(stack, register)
    for r in stack.tables.get("zmatches", []):
        pair = used.get((r.get("fixed_id"), r.get("moving_id")))
        if pair is None or not (pair.manual or pair.verified):
            continue
        # The user's z-match only when stacking took it from the row (source "ncc": searched by stacking) and the
        # row has not changed since (a z set by hand after stacking is not in the volume).
        from_row = str(r.get("source") or "registration") == "registration"
        found = r.get("found")
        if from_row and (found is None or found == pair.z_match_plane):
            r["_by_hand"] = hand_note(pair.manual, pair.verified)
    z_spread(stack)
    placed = 0
    for r in stack.tables.get("decisions", []):
        pair = used.get((r.get("fixed_id"), r.get("slice_id")))
        gate = str(r.get("gate") or "").lower()
        reason = str(r.get("reason") or "")
        applied_manual = bool(r["manual"]) if r.get("manual") is not None else bool(pair is not None and pair.manual)
        if pair is not None and bool(pair.manual) != applied_manual:
            # The table changed after stacking: the volume does not hold what the user decided now.
            r["_hand_not_applied"] = True
            r["_reason"] = (f"{reason}; " if reason else "") + (
                "set by hand after stacking: restack" if pair.manual else
                "the hand-set transform stacked was reset to the automatic one since: restack")
            continue
        if applied_manual:
            if gate == "skip":  # a hand-set pair that stacking did not apply: not what the user decided
                r["_reason"] = f"{reason}; set by hand" if reason else "set by hand"
                continue
            placed += 1
            r["_by_hand"] = hand_note(True, pair is not None and pair.verified)
            dropped = gate == "rotation" and (pair is None or bool(pair.tx_px or pair.ty_px))
            r["_hand_not_applied"] = dropped or "rotation clamped" in reason
        elif pair is not None and pair.verified and gate == "skip":
            if pair.is_identity:
                r["_by_hand"] = VERIFIED + " (the identity)"
            else:
                r["_reason"] = (f"{reason}; " if reason else "") + ("verified by hand but dropped by the confidence "
                                                                     "gate: set the pair by hand to apply it")
    if placed:
        stack.hand_counts[PLACED_BY_HAND] = placed
