"""Command line and config files generated from the step declarations."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from conftest import structured_tile, write_raw_tile
from napari_soct.pipeline.cli import main
from napari_soct.pipeline.config import defaults_toml, load_config, tomllib
from napari_soct.pipeline.steps import STEPS
from napari_soct.processing.params import param_infos
from napari_soct.processing.preprocess import PreprocessParams

SHAPE = (8, 12, 16)


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    truth = {}
    for z in (0, 1):
        for x in range(2):
            truth[(z, x)] = write_raw_tile(root / f"tile_x{x:02d}_y00_z{z:02d}", structured_tile(SHAPE, 10 * z + x),
                                           band_start=3, stage_mm=(0.3 * x, 0.0))
    return root, truth


def test_defaults_toml_is_every_parameter_once(tmp_path):
    text = defaults_toml()
    data = tomllib.loads(text)
    assert set(data) == set(STEPS) | {"run"}
    infos = param_infos(PreprocessParams)
    assert data["preprocess"] == {i.name: i.default for i in infos}
    for info in infos:  # the help text is the declaration's
        assert f"# {info.help}" in text
    (tmp_path / "run.toml").write_text(text)
    assert load_config(tmp_path / "run.toml")["preprocess"] == PreprocessParams()


@pytest.mark.parametrize(
    "body, message",
    [
        ("[preprocess]\nfix_galvo = true\n", "unknown parameter.*preprocess.fix_galvo"),
        ("[preprocess]\nworkers = 0\n", "preprocess.workers.*below the minimum 1"),
        ("[preprocess]\ncompression = 'lzma'\n", "preprocess.compression.*not one of"),
        ("[stitch_everything]\n", "unknown section"),
        ("[preprocess\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, body, message):
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path / "bad.toml")


def test_cli_preprocess_with_config_and_options(raw, tmp_path, capsys):
    root, truth = raw
    (tmp_path / "run.toml").write_text("[preprocess]\nfix_galvo_shift = false\nsharding_factor = 0\n")
    out = tmp_path / "out"
    # The command line wins over the config file: galvo fix back on.
    assert main(["preprocess", str(root), str(out), "--config", str(tmp_path / "run.toml"), "--fix-galvo-shift",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 mosaic grid(s) written" in printed and "shifts_xy.csv" in printed
    arr = zarr.open_array(str(out / "mosaic_grid_3d_z01.ome.zarr" / "0"))
    assert arr.shards is None  # from the config file
    np.testing.assert_allclose(arr[:, :, SHAPE[2]:], truth[(1, 1)], rtol=1e-6)


def test_cli_errors_are_messages_not_tracebacks(raw, tmp_path, capsys):
    root, _ = raw
    assert main(["preprocess", str(tmp_path), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a raw S-OCT acquisition" in err and "Traceback" not in err
    assert main(["preprocess", str(root), str(tmp_path / "o"), "--galvo-confidence-threshold", "2", "--quiet"]) == 2
    assert "galvo_confidence_threshold" in capsys.readouterr().err
    assert main(["preprocess", str(root), str(tmp_path / "o2"), "--quiet"]) == 0
    assert main(["preprocess", str(root), str(tmp_path / "o2"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_help_lists_every_parameter(capsys):
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    text = capsys.readouterr().out
    for info in param_infos(PreprocessParams):
        assert "--" + info.name.replace("_", "-") in text


def test_cli_synth_and_demo(tmp_path, capsys):
    from napari_soct.processing.synthetic import SyntheticAcquisition

    assert main(["synth", str(tmp_path / "s"), "--preset", "tiny", "--seed", "2", "--quiet"]) == 0
    acq = SyntheticAcquisition.load(tmp_path / "s")
    assert acq.config.seed == 2 and len(acq.slice_ids) == 3
    assert str(acq.raw_dir) in capsys.readouterr().out
    assert main(["demo", str(tmp_path / "d"), "--preset", "tiny", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "3 mosaic grid(s) written" in printed
    grids = sorted((tmp_path / "d" / "preprocess").glob("mosaic_grid_3d_z*.ome.zarr"))
    assert len(grids) == 3
    finals = sorted((tmp_path / "d" / "reconstruct" / "07_normalize").glob("slice_z*_normalize.ome.zarr"))
    assert len(finals) == 3
    volume = tmp_path / "d" / "reconstruct" / "14_stack" / "brain.ome.zarr"
    assert volume.is_dir() and str(volume) in printed
    assert (tmp_path / "d" / "reconstruct" / "report.html").is_file()


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_step_has_a_working_cli(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for info in STEPS[name].param_infos:
        assert "--" + info.name.replace("_", "-") in text
