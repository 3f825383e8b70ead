"""Evidence files (harness/report/npz.py): ordinary .npz files that numpy.load reads back exactly, compressed."""
import numpy as np
import pytest

from harness.report.npz import save_npz


def test_save_npz_round_trips_and_compresses(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"idx": rng.integers(0, 8, (4096, 128)).astype(np.uint8), "x": rng.standard_normal((64, 128)).astype(np.float32),
              "scalar": np.float64(0.25), "f16": np.arange(10, dtype=np.float16)}
    p = save_npz(tmp_path / "e.npz", arrays)
    with np.load(p) as d:
        assert sorted(d.files) == sorted(arrays)
        for k, v in arrays.items():
            assert d[k].dtype == np.asarray(v).dtype
            np.testing.assert_array_equal(d[k], v)
    assert p.stat().st_size < 0.6 * sum(np.asarray(v).nbytes for v in arrays.values())  # 3-bit indices deflate well


def test_save_npz_refuses_objects(tmp_path):
    with pytest.raises(ValueError):
        save_npz(tmp_path / "o.npz", {"o": np.array([{"a": 1}], dtype=object)})
