"""Quality report and pairs decided by hand (issue 9): the real registration (step 12) on slices with known
faults, pairs then set or verified by hand through the alignment session (as the widget does), the real stacking
(step 14), and the report: the automatic-registration checks of hand-decided pairs are OK with a note and counted
apart, an unmarked bad pair still warns, a hand alignment that slipped warns.

Slices are cut from a smooth random field with mild speckle. Ground truth: slices 2 and 3 are shifted by
``DRIFT`` (beyond step 12's max_translation_px, so pair 1 -> 2 falls back to the identity while its true
transform is ``DRIFT``); slices 4 and 5 come from unrelated fields (pairs 3 -> 4 and 4 -> 5 have nothing in
common); pairs 0 -> 1 and 2 -> 3 are aligned as placed (true transform: the identity)."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from napari_soct.processing.io.omezarr import create_ome_zarr_image
from napari_soct.processing.report import ReportParams, generate_report
from napari_soct.processing.stack.manual import open_alignment, read_alignment_table
from napari_soct.processing.stack.register import RegistrationParams, register_pairwise
from napari_soct.processing.stack.stacking import StackParams, stack_slices
from napari_soct.processing.stack.transforms import PairTransform, read_pairwise_registration

CANVAS = (96, 104)
MARGIN = 8
T, NZ, VALID = 8, 24, 20  # planes per cut, planes per slice, planes with data
DRIFT = PairTransform(1, 2, tx_px=24.0, ty_px=-6.0, center_x_px=51.5, center_y_px=47.5)
SLIP_PX = 4.0  # the hand alignment of pair 0 -> 1 that slipped (its true transform is the identity)
#: The checks that judge the automatic registration (a pair decided by hand passes them with a note).
AUTOMATIC = {"pair_ncc_after", "pair_ncc_gain", "pair_confidence", "pair_translation", "pair_rotation",
             "pair_z_match", "pair_z_ncc", "pair_fallback", "pair_failed", "z_overlap", "z_overlap_ncc",
             "z_overlap_corrected", "transform_skipped"}


def _field(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = gaussian_filter(rng.normal(size=(n, *CANVAS)), (1.5, 2.0, 2.0))
    return (1.0 + (vol - vol.min()) / (vol.max() - vol.min())).astype(np.float32)


def _moved(plane: np.ndarray, pair: PairTransform, mask: np.ndarray) -> np.ndarray:
    """Content of a moving slice whose true transform is ``pair`` (map_coordinates, not the code under test)."""
    yy, xx = np.indices(plane.shape, dtype=float)
    q = pair.apply(np.stack([xx.ravel(), yy.ravel()], axis=1))
    out = map_coordinates(plane, [q[:, 1], q[:, 0]], order=1, mode="nearest").reshape(plane.shape)
    return np.where(mask, out, 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """10_common (6 slices) and the real step 12 on them."""
    root = tmp_path_factory.mktemp("by_hand")
    rng = np.random.default_rng(0)
    mask = np.zeros(CANVAS, bool)
    mask[MARGIN:-MARGIN, MARGIN:-MARGIN] = True
    tissue = _field(3, 5 * T + NZ)
    unrelated = {4: _field(11, NZ), 5: _field(17, NZ)}
    origin = [7.0, 11.0]
    for k in range(6):
        data = np.zeros((NZ, *CANVAS), np.float32)
        for p in range(VALID):
            plane = unrelated[k][p] if k in unrelated else tissue[k * T + p]
            plane = _moved(plane, DRIFT, mask) if k in (2, 3) else np.where(mask, plane, 0.0)
            data[p] = plane * np.where(mask, rng.gamma(1000, 1 / 1000, CANVAS), 0.0)  # mild speckle (3 %)
        soct = {"slice_id": k, "voxel_size_um": [10.0] * 3, "origin_mm": origin, "canvas_origin_mm": origin,
                "stage_z_mm": round(5.0 + k * T * 0.01, 6)}
        arr = create_ome_zarr_image(root / "10_common" / f"slice_z{k:02d}_common.ome.zarr", data.shape,
                                    (0.01,) * 3, chunks=(8, 48, 52), attributes={"soct": soct})
        arr[...] = data
    register_pairwise(root / "10_common", root / "12_register", RegistrationParams(overlay_max_px=0))
    return root


def _flagged(findings, step="register") -> dict[tuple, set]:
    """{(fixed, moving): check ids} of the findings of a step's pairs."""
    out: dict[tuple, set] = {}
    for f in findings:
        if f.step == step and f.row and "moving_id" in f.row:
            out.setdefault((f.row["fixed_id"], f.row["moving_id"]), set()).add(f.check)
    return out


@pytest.fixture(scope="module")
def decided(registered, tmp_path_factory):
    """The report before any hand edit, then pairs set / verified by hand, restacked, and the report again."""
    rec = tmp_path_factory.mktemp("decided") / "rec"
    shutil.copytree(registered, rec)
    before = generate_report(rec, rec / "before.html", ReportParams(previews=False))

    session = open_alignment(rec)
    session.set_transform((1, 2), tx_px=DRIFT.tx_px, ty_px=DRIFT.ty_px, rotation_deg=0.0, z_match_plane=T)
    session.set_transform((0, 1), tx_px=SLIP_PX, ty_px=0.0, rotation_deg=0.0, z_match_plane=T)
    session.set_verified((4, 5))  # the user looked: nothing in common, the identity fallback is accepted
    # What the user saw in the widget (overlap view) for the automatic and the hand-set transforms.
    seen = {key: (session.ncc(key, pair=session.automatic[key]), session.ncc(key)) for key in ((0, 1), (1, 2))}
    session.save()
    stack = stack_slices(rec / "10_common", rec / "12_register" / "pairwise_registration.csv", rec / "14_stack",
                         StackParams(subject="s", memory_budget_gb=0.5))
    after = generate_report(rec, params=ReportParams(previews=False))
    return SimpleNamespace(rec=rec, before=before, after=after, seen=seen, stack=stack)


def test_the_faults_are_real_before_any_hand_edit(decided):
    pairs = {(p.fixed_id, p.moving_id): p for p in
             read_alignment_table(decided.rec / "12_register" / "pairwise_registration.csv")[1].values()}
    # Step 12 itself: the drift and the unrelated slices fall back to the identity, the aligned pairs do not.
    assert {k for k, p in pairs.items() if p.status == "fallback_identity"} == {(1, 2), (3, 4), (4, 5)}
    flagged = _flagged(decided.before.findings)
    assert set(flagged) == {(1, 2), (3, 4), (4, 5)}, flagged
    assert all("pair_fallback" in checks and checks <= AUTOMATIC for checks in flagged.values())
    assert not decided.before.by_hand and not decided.before.step("register").hand_counts


def test_pairs_decided_by_hand_are_ok_with_a_note_and_counted_apart(decided):
    before, after = _flagged(decided.before.findings), _flagged(decided.after.findings)
    hand = _flagged(decided.after.by_hand)
    notes = {(f.row["fixed_id"], f.row["moving_id"]): f.note for f in decided.after.by_hand if f.step == "register"}
    # Set by hand (the true transform) and verified: no automatic-registration warning or error is left ...
    assert (1, 2) not in after and (4, 5) not in after
    # ... they are listed as OK with their note instead: the verified pair exactly where it failed before, the
    # hand-set pair where its own values fail (a 24.7 px translation: the drift the user corrected).
    assert hand[(4, 5)] == before[(4, 5)] and notes[(4, 5)] == "verified by hand"
    assert "pair_translation" in hand[(1, 2)] and hand[(1, 2)] <= AUTOMATIC and notes[(1, 2)] == "set by hand"
    assert all(f.level == "ok" and "(OK: " in f.message for f in decided.after.by_hand)
    # The pair nobody touched still warns, exactly as before.
    assert after[(3, 4)] == before[(3, 4)]
    register = decided.after.step("register")
    assert register.hand_counts == {"set by hand": 2, "verified by hand": 1}
    assert register.by_hand_text == "2 pairs set by hand, 1 pair verified by hand"
    from napari_soct.pipeline import STEPS

    # The one-line status of the Report widget and the CLI says it too.
    assert "decided by hand: 2 pairs set by hand, 1 pair verified by hand" in STEPS["report"].summary(decided.after)
    assert register.n_by_hand == sum(f.step == "register" for f in decided.after.by_hand)
    assert register.status == "error"  # pair 3 -> 4 (and the slip below)
    assert register.n_warnings + register.n_errors == sum(f.step == "register" for f in decided.after.findings)

    page = decided.after.path.read_text()
    assert "Decided by hand: register: 2 pairs set by hand, 1 pair verified by hand" in page
    rows = _FindingRows.of(page)
    assert {(c, n) for c, level, n in rows if level == "ok"} == {(f.check, f.note) for f in decided.after.by_hand}
    assert all(level != "ok" for c, level, n in rows if not n)


def test_a_hand_alignment_that_slipped_still_warns(decided):
    pairs = {(r["fixed_id"], r["moving_id"]): r for r in
             [f.row for f in decided.after.findings if f.check == "hand_ncc_loss"]}
    assert set(pairs) == {(0, 1)}  # the slip; the correct hand alignment of 1 -> 2 scores better than automatic
    (slip,) = [f for f in decided.after.findings if f.check == "hand_ncc_loss"]
    auto_seen, hand_seen = decided.seen[(0, 1)]
    # Measured on what the user saw in the widget (same view), not on step 12's differently made NCC.
    assert slip.level == "warning" and slip.value == pytest.approx(auto_seen - hand_seen, abs=1e-6) and slip.value > 0.1
    auto_seen, hand_seen = decided.seen[(1, 2)]
    assert hand_seen > auto_seen + 0.2
    row = next(r for r in _register_rows(decided) if (r["fixed_id"], r["moving_id"]) == (1, 2))
    assert row["hand_view_ncc"] == pytest.approx(hand_seen, abs=1e-6)
    assert row["auto_view_ncc"] == pytest.approx(auto_seen, abs=1e-6)


def _register_rows(decided):
    from napari_soct.processing.report.collect import collect_run

    return collect_run(decided.rec).step("register").tables["pairs"]


def test_stacking_applied_the_hand_set_pairs_without_warnings(decided):
    decisions = {d.slice_id: d for d in decided.stack.decisions}
    assert (decisions[1].gate, decisions[1].reason) == ("full", "manual")  # reason=manual in the decisions CSV
    assert (decisions[2].gate, decisions[2].reason) == ("full", "manual")
    assert decisions[2].tx_px == pytest.approx(DRIFT.tx_px) and decisions[2].ty_px == pytest.approx(DRIFT.ty_px)
    assert decisions[4].gate == decisions[5].gate == "skip"
    stack_problems = [f for f in decided.after.findings if f.step == "stack"]
    about = {f.row.get("slice_id", f.row.get("moving_id")) for f in stack_problems}
    # The unrelated slice 4 (pair 3 -> 4, not touched) still warns; hand-set 1, 2 and verified 5 do not.
    assert about == {4}, [f.message for f in stack_problems]
    assert {f.check for f in stack_problems} >= {"transform_skipped", "z_overlap_ncc"}
    stack_ok = {(f.check, f.row.get("slice_id", f.row.get("moving_id"))) for f in decided.after.by_hand
                if f.step == "stack"}
    assert ("transform_skipped", 5) in stack_ok and ("z_overlap_ncc", 5) in stack_ok
    assert decided.after.step("stack").hand_counts == {"slice(s) placed by a hand-set transform": 2}


def test_motor_only_stacking_and_a_stale_stack_are_not_excused(decided, tmp_path):
    # Motor-only stacking used no hand decision: its skipped transforms are warnings for every slice.
    rec = tmp_path / "motor"
    shutil.copytree(decided.rec, rec, ignore=shutil.ignore_patterns("14_stack", "*.html"))
    stack_slices(rec / "10_common", "", rec / "14_stack", StackParams(subject="s", memory_budget_gb=0.5))
    result = generate_report(rec, params=ReportParams(previews=False))
    skipped = {f.row["slice_id"] for f in result.findings if f.check == "transform_skipped"}
    assert skipped == {1, 2, 3, 4, 5} and not [f for f in result.by_hand if f.step == "stack"]
    assert "no registration" in next(f.message for f in result.findings if f.check == "transform_skipped")

    # The hand-set pair 1 -> 2 reset to automatic after stacking: the volume no longer shows what the table says.
    rec = tmp_path / "stale"
    shutil.copytree(decided.rec, rec, ignore=shutil.ignore_patterns("*.html"))
    session = open_alignment(rec)
    session.reset_to_automatic((1, 2))
    session.save()
    table = read_pairwise_registration(rec / "12_register" / "pairwise_registration.csv")
    assert [(p.fixed_id, p.moving_id) for p in table if p.manual] == [(0, 1)]
    result = generate_report(rec, params=ReportParams(previews=False))
    (stale,) = [f for f in result.findings if f.check == "hand_not_applied"]
    assert stale.row["slice_id"] == 2 and "restack" in stale.message and stale.level == "warning"


def test_rotation_only_stacking_warns_that_the_hand_set_translation_was_dropped(decided, tmp_path):
    rec = tmp_path / "rotation_only"
    shutil.copytree(decided.rec, rec, ignore=shutil.ignore_patterns("14_stack", "*.html"))
    stack_slices(rec / "10_common", rec / "12_register", rec / "14_stack",
                 StackParams(subject="s", memory_budget_gb=0.5, apply_rotation_only=True))
    result = generate_report(rec, params=ReportParams(previews=False))
    dropped = {f.row["slice_id"] for f in result.findings if f.check == "hand_not_applied"}
    assert dropped == {1, 2}  # both hand-set pairs have a translation, which apply_rotation_only leaves out


class _FindingRows(HTMLParser):
    """(check, level, note) of the rows of the report's findings table."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-check" in a:
            self.rows.append((a["data-check"], a["data-level"], a["data-note"]))

    @classmethod
    def of(cls, text: str) -> list[tuple]:
        parser = cls()
        parser.feed(text)
        parser.close()
        return parser.rows
