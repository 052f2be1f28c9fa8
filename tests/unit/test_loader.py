import numpy as np
import pytest

from iiotfl.tasks.predictive_maintenance.generator import generate_plant
from iiotfl.tasks.predictive_maintenance.loader import CMAPSS_SENSORS, DataFormatError, load_cmapss, load_csv, save_csv


@pytest.fixture(scope="module")
def plant():
    return generate_plant(1, 0, n_units=4)


def test_csv_round_trip(tmp_path, plant):
    path = tmp_path / "plant.csv"
    save_csv(plant, path)
    back = load_csv(path, settings=list(plant.setting_names))
    assert back.sensor_names == plant.sensor_names
    assert np.array_equal(back.unit, plant.unit) and np.array_equal(back.cycle, plant.cycle)
    assert np.allclose(back.sensors, plant.sensors) and np.allclose(back.settings, plant.settings)
    assert np.allclose(back.rul, plant.rul)


def test_csv_custom_columns_separator_and_derived_rul(tmp_path, plant):
    path = tmp_path / "site.csv"
    rows = ["serial;ts;" + ";".join(plant.sensor_names)]
    order = np.random.default_rng(0).permutation(len(plant))  # rows out of order on purpose
    for i in order:
        ts = np.datetime64("2026-01-01T00:00") + np.timedelta64(int(plant.cycle[i]), "h")
        rows.append(f"SN-{plant.unit[i]:04d};{ts};" + ";".join(f"{v:.6f}" for v in plant.sensors[i]))
    path.write_text("\n".join(rows) + "\n")
    data = load_csv(path, unit="serial", time="ts", rul=None, sep=";")
    assert data.n_units == plant.n_units
    assert np.allclose(np.minimum(data.rul, 125), plant.rul)  # derived: run-to-failure, then capped
    assert np.allclose(data.sensors, plant.sensors, atol=1e-5)
    assert set(data.extra["unit_ids"].values()) == {f"SN-{u:04d}" for u in range(1, 5)}


def _write_cmapss(path, plant, units=None):
    lines = []
    for i in range(len(plant)):
        if units is not None and plant.unit[i] not in units:
            continue
        full = np.full(21, 1.0)
        for j, name in enumerate(plant.sensor_names):
            full[CMAPSS_SENSORS.index(name)] = plant.sensors[i, j]
        vals = [plant.unit[i], plant.cycle[i], *plant.settings[i], *full]
        lines.append(" ".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in vals))
    path.write_text("\n".join(lines) + "\n")


def test_cmapss_round_trip_and_test_file_rul(tmp_path, plant):
    train = tmp_path / "train_FD002.txt"
    _write_cmapss(train, plant)
    data = load_cmapss(train).select_sensors(list(plant.sensor_names))
    assert np.allclose(data.sensors, plant.sensors, atol=1e-5)
    assert np.allclose(data.settings, plant.settings, atol=1e-5)
    assert np.allclose(np.minimum(data.rul, 125), plant.rul)
    # a test file: trajectories cut early, the RUL file gives each unit's RUL at its last row
    cut = plant.subset(plant.cycle <= 50)
    test, rul = tmp_path / "test_FD002.txt", tmp_path / "RUL_FD002.txt"
    _write_cmapss(test, cut)
    finals = [int(plant.unit[plant.unit == u].size - 50) for u in range(1, 5)]
    rul.write_text("\n".join(map(str, finals)) + "\n")
    tdata = load_cmapss(test, rul)
    for u in range(1, 5):
        r = tdata.rul[tdata.unit == u]
        assert r[-1] == finals[u - 1] and r[0] == finals[u - 1] + 49


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", r"empty"),
        ("unit,cycle,T30\n1,1,1590\n1,2,1591\n", None),  # good control case
        ("unit,cycle,T30\n1,1,1590\n1,2,abc\n", r"row 3, column 'T30'.*not a number"),
        ("unit,time,T30\n1,1,1590\n1,2,1591\n", r"column 'cycle' missing.*task.data.csv"),
        ("unit,cycle,T30\n1,1,1590\n1,2,1591\n2,1,1600\n", r"unit '2' \(row 4\) has only one row"),
        ("unit,cycle,T30\n1,1,1590\n1,2\n", r"row 3 has 2 fields"),
        # hostile values: one of these in one plant's file would turn every plant's statistics NaN
        ("unit,cycle,T30\n1,1,1590\n1,2,1.7976931348623157e308\n", r"row 3, column 'T30'.*out of range"),
        ("unit,cycle,T30\n1,1,1590\n1,2,-1e13\n", r"row 3, column 'T30'.*out of range"),
        ("unit,cycle,T30\n1,1,1590\n1,nan,1591\n", r"row 3, column 'cycle'.*not a finite cycle"),
        ("unit,cycle,T30\n1,1,1590\n1,inf,1591\n", r"row 3, column 'cycle'.*not a finite cycle"),
        ("unit,cycle,T30\n1,1,1590\n1,2,1591\n1,2,1592\n", r"row 4 repeats unit '1' at cycle 2 \(bad.csv row 3\)"),
        ("unit,cycle,T30,T30\n1,1,1590,1\n1,2,1591,2\n", r"column 'T30' appears twice in the header"),
        ("unit,cycle,T30,rul\n1,1,1590,1\n1,2,1591,-1\n", r"row 3, column 'rul'.*is negative"),
        ("unit,cycle,T30\n1,1,1590\n1,2,1" + "9" * 200_000 + "\n", r"not a readable CSV file.*field larger"),
    ],
)
def test_malformed_csv_gives_one_line_error(tmp_path, content, expected):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    if expected is None:
        assert load_csv(path).n_units == 1
        return
    with pytest.raises(DataFormatError, match=expected) as err:
        load_csv(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_wrong_separator_is_named(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("unit;cycle;T30\n1;1;1590\n1;2;1591\n")
    with pytest.raises(DataFormatError, match=r"sep"):
        load_csv(path)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", r"empty"),
        ("1 1 0 0 100 " + "1 " * 20 + "\n", r"row 1 has 25 columns, C-MAPSS has 26"),
        ("1 1 0 0 100 " + "1 " * 20 + "x\n1 2 0 0 100 " + "1 " * 21 + "\n", r"row 1, column 26 \(W32\)"),
        ("1 1 0 0 100 " + "1 " * 21 + "\n", r"unit '1' \(row 1\) has only one row"),
    ],
)
def test_malformed_cmapss_gives_one_line_error(tmp_path, content, expected):
    path = tmp_path / "train_FD001.txt"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=expected) as err:
        load_cmapss(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_growing_data_directory_is_read_as_one_table(tmp_path, plant):
    whole = tmp_path / "whole.csv"
    save_csv(plant, whole)
    lines = whole.read_text().splitlines()
    header, body = lines[0], lines[1:]
    days = tmp_path / "gateway-data"
    days.mkdir()
    half = len(body) // 2  # units span both files
    (days / "2026-11-01.csv").write_text("\n".join([header, *body[:half]]) + "\n")
    (days / "2026-11-02.csv").write_text("\n".join([header, *body[half:]]) + "\n")
    back = load_csv(days, settings=list(plant.setting_names))
    assert np.array_equal(back.unit, plant.unit) and np.array_equal(back.cycle, plant.cycle)
    assert np.allclose(back.sensors, plant.sensors) and np.allclose(back.rul, plant.rul)
    (days / "2026-11-03.csv").write_text(header.replace("unit", "serial") + "\n")
    with pytest.raises(DataFormatError, match="2026-11-03.csv: header .* differs"):
        load_csv(days)
    (tmp_path / "no-files-yet").mkdir()
    with pytest.raises(DataFormatError, match="no \\*.csv files"):
        load_csv(tmp_path / "no-files-yet")


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("unit,cycle,Temp\u00e9rature\n1,1,1590\n1,2,1591\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1.csv: not UTF-8 text \(it holds byte b'\\xe9'\); save it as UTF-8"):
        load_csv(path)
