"""The reference math against textbook values and its own invariants."""
import numpy as np
import pytest
from scipy.linalg import hadamard

from harness.reference import turbo as T
from harness.reference.attention import attention
from harness.reference.lloydmax import expected_distortion, lloyd_max, turboquant_upper_bound
from harness.reference.wht import factor_signed_wht, signed_wht_matrix, wht_forward, wht_inverse


@pytest.mark.parametrize("bits,expected", [
    (2, [0.4528, 1.5104]),
    (3, [0.2451, 0.7560, 1.3439, 2.1519]),
])
def test_lloyd_max_std_normal_textbook(bits, expected):
    cb = lloyd_max(bits, "std_normal")
    pos = cb.centroids[cb.centroids > 0]
    np.testing.assert_allclose(pos, expected, atol=1e-3)
    np.testing.assert_allclose(cb.centroids, -cb.centroids[::-1], atol=1e-12)


def test_lloyd_max_4bit_outermost():
    cb = lloyd_max(4, "std_normal")
    assert abs(cb.centroids[-1] - 2.7326) < 1e-3
    assert abs(cb.distortion - 0.009497) < 2e-5  # Max (1960), 16 levels


def test_lloyd_max_fixed_point():
    cb = lloyd_max(3, "beta", 128)
    np.testing.assert_allclose(cb.thresholds, 0.5 * (cb.centroids[1:] + cb.centroids[:-1]))
    # moving any centroid increases the distortion
    for i in range(8):
        c = cb.centroids.copy()
        c[i] *= 1.02
        assert expected_distortion(c, cb.thresholds, "beta", 128) > cb.distortion


@pytest.mark.parametrize("kind,d", [("beta", 128), ("beta", 8), ("gaussian", 128), ("std_normal", 1)])
def test_expected_distortion_closed_form_matches_quadrature(kind, d):
    """The closed-form cell moments against numerical integration of (x - c)^2 f(x) over each cell (scipy's quad),
    for Lloyd-Max codebooks and for perturbed, uneven quantisers (a wrong moment formula moves the value)."""
    from scipy import integrate, stats
    pdf = {"beta": lambda x: stats.beta.pdf(x, (d - 1) / 2, (d - 1) / 2, loc=-1, scale=2),
           "gaussian": lambda x: stats.norm.pdf(x, scale=1 / np.sqrt(d)),
           "std_normal": stats.norm.pdf}[kind]
    lo, hi = (-1.0, 1.0) if kind == "beta" else (-np.inf, np.inf)
    rng = np.random.default_rng(5)
    for bits in (1, 2, 4):
        cb = lloyd_max(bits, kind, d)
        for c, t in ((cb.centroids, cb.thresholds),
                     (cb.centroids * (1 + 0.1 * rng.standard_normal(len(cb.centroids))),
                      np.sort(cb.thresholds + 0.05 * cb.centroids[-1] * rng.standard_normal(len(cb.thresholds))))):
            edges = np.concatenate([[lo], t, [hi]])
            want = sum(integrate.quad(lambda x, ci=ci: (x - ci) ** 2 * pdf(x), edges[i], edges[i + 1],
                                      limit=200, epsabs=1e-14, epsrel=1e-10)[0] for i, ci in enumerate(c))
            assert expected_distortion(c, t, kind, d) == pytest.approx(want, rel=1e-8, abs=1e-15)


def test_beta_close_to_gaussian_limit_and_below_bound():
    for b in (2, 3, 4):
        beta = lloyd_max(b, "beta", 128)
        gauss = lloyd_max(b, "gaussian", 128)
        assert abs(beta.centroids[-1] / gauss.centroids[-1] - 1) < 0.02
        assert 128 * beta.distortion < turboquant_upper_bound(b)


def test_hadamard_is_scipys():
    from harness.reference.wht import hadamard as own
    for n in (1, 2, 4, 64, 128, 256):
        np.testing.assert_array_equal(own(n), hadamard(n))
    with pytest.raises(ValueError):
        own(96)


def test_wht_orthogonal_and_self_inverse_up_to_signs():
    rng = np.random.default_rng(0)
    s1, s2 = rng.choice([-1, 1], 128), rng.choice([-1, 1], 128)
    R = signed_wht_matrix(s1, s2)
    np.testing.assert_allclose(R @ R.T, np.eye(128), atol=1e-12)
    H = hadamard(128) / np.sqrt(128)
    np.testing.assert_allclose(H @ H, np.eye(128), atol=1e-12)  # self-inverse without signs
    # with signs swapped the same structure inverts it
    np.testing.assert_allclose(signed_wht_matrix(s2, s1) @ R, np.eye(128), atol=1e-12)
    x = rng.standard_normal((5, 128))
    np.testing.assert_allclose(wht_inverse(wht_forward(x, s1, s2), s1, s2), x, atol=1e-12)


def test_factor_signed_wht_recovers_signs_and_rejects_dense():
    from scipy.stats import ortho_group
    rng = np.random.default_rng(1)
    s1, s2 = rng.choice([-1, 1], 128), rng.choice([-1, 1], 128)
    f = factor_signed_wht(signed_wht_matrix(s1, s2))
    assert f["is_signed_wht"]
    sign = 1 if s1[0] > 0 else -1
    np.testing.assert_array_equal(f["s1"], sign * s1)
    np.testing.assert_array_equal(f["s2"], sign * s2)
    assert not factor_signed_wht(ortho_group.rvs(128, random_state=3))["is_signed_wht"]


@pytest.mark.parametrize("t", T.TURBO_TYPES)
def test_pack_unpack_roundtrip(t):
    f = T.fmt(t)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, f.levels, (7, 128))
    n = rng.uniform(0.1, 10, 7)
    raw = T.pack(t, idx, n)
    assert raw.shape == (7, f.group_bytes)
    i2, n2, res = T.unpack(t, raw)
    np.testing.assert_array_equal(i2, idx)
    np.testing.assert_array_equal(n2, n.astype(np.float16))
    assert not res.any()


def test_packing_bit_order_little_endian():
    idx = np.zeros((1, 128), np.uint8)
    idx[0, 1] = 3  # second element of the first byte -> bits 2..3
    assert T.pack("turbo2", idx, [1.0])[0, 2] == 0b00001100
    idx = np.zeros((1, 128), np.uint8)
    idx[0, 0], idx[0, 1] = 1, 15
    assert T.pack("turbo4", idx, [1.0])[0, 4] == 0xF1
    idx = np.zeros((1, 128), np.uint8)
    idx[0, 9] = 4  # high bit of element 9 -> signs byte 1 bit 1
    assert T.pack("turbo3", idx, [1.0])[0, 2 + 32 + 1] == 0b10


def test_norm_correction_gives_unit_ratio():
    rng = np.random.default_rng(3)
    cb = lloyd_max(3, "beta", 128)
    R = signed_wht_matrix(rng.choice([-1, 1], 128), rng.choice([-1, 1], 128))
    x = rng.standard_normal((50, 128))
    idx, stored, _ = T.quantize(x, R, cb.centroids, cb.thresholds)
    dec = cb.centroids[idx] * stored[:, None]
    np.testing.assert_allclose(np.linalg.norm(dec, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    _, raw_norm, _ = T.quantize(x, R, cb.centroids, cb.thresholds, corrected=False)
    shrink = np.linalg.norm(cb.centroids[idx] * raw_norm[:, None], axis=1) / np.linalg.norm(x, axis=1)
    assert shrink.mean() < 0.995  # the codebook shrinks vectors on average: why the norm is corrected


def test_classic_roundtrip():
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    for t, tol in (("q8_0", 0.02), ("q4_0", 0.3)):
        back = T.decode_any(t, T.quantize_classic(t, x), 4, 64)
        assert np.max(np.abs(back - x)) < tol * np.max(np.abs(x))


def test_attention_gqa_matches_manual():
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((4, 3, 8)), rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 6))
    out = attention(q, k, v, 0.3)
    h = 3  # uses kv head 1
    s = 0.3 * q[h] @ k[1].T
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(out[:, h, :], p @ v[1], atol=1e-12)


def test_legacy_32_value_blocks_selected_from_traits_and_round_trip():
    lay = T.select_layouts({"turbo3": {"block_size": 32, "type_size": 14}, "turbo2": {"block_size": 32, "type_size": 10},
                            "turbo4": {"block_size": 128, "type_size": 99}})
    assert lay.formats["turbo3"].block == 32 and "turbo3" not in lay.unknown
    assert lay.notes and "turbo4: 128 values in 99 bytes, no known layout" in lay.notes[0]  # unknown traits are reported
    with T.layouts_in_use(lay):
        assert T.fmt("turbo3").block == 32 and T.fmt("turbo3").group_bytes == 56
        with pytest.raises(T.UnknownLayout, match="no known layout"):
            T.fmt("turbo4")
        rng = np.random.default_rng(9)
        idx = rng.integers(0, 8, (3, 128))
        raw = T.pack("turbo3", idx, [1.0, 2.0, 3.0])
        assert raw.shape == (3, 56)
        # every 14-byte block carries the group's norm
        assert np.all(raw.reshape(12, 14)[:, :2].copy().view(np.float16).reshape(3, 4) == np.array([[1.0], [2.0], [3.0]], np.float16))
        i2, n2, _ = T.unpack("turbo3", raw)
        np.testing.assert_array_equal(i2, idx)
    assert T.fmt("turbo3").block == 128  # nothing global changed
