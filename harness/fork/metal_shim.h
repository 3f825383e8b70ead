// turbo-harness: a compatibility header that lets Metal Shading Language per-block code compile as host C++.
//
// It is the harness's own code (no line of it comes from the fork). What it gives:
//  - the address-space qualifiers device / thread / threadgroup as nothing, constant as const, kernel as nothing;
//  - half: IEEE binary16 storage with every arithmetic result rounded to binary16 (round to nearest even), as an
//    Apple GPU's half arithmetic rounds; float <-> half conversions by bit manipulation (no F16C needed);
//  - the `1.0h` literal (a literal operator), half2/half4/float4/uint3 vectors with .x/.y/.z/.w and [],
//    element-wise + - * and broadcast constructors, float4x4 as four float4 columns;
//  - sqrt/fabs/min/max from <cmath> under the names metal:: code calls.
// What it does not give (and the harness never claims): simdgroup functions, threadgroup barriers, Metal's fast-math
// choices, the GPU's own sqrt/division rounding. `#pragma METAL` lines are ignored by the host compiler
// (-Wno-unknown-pragmas); Metal's [[attribute]] arguments are ignored (-Wno-attributes).
#ifndef TURBO_HARNESS_METAL_SHIM_H
#define TURBO_HARNESS_METAL_SHIM_H

#include <cmath>
#include <cstdint>
#include <cstring>

#define device
#define thread
#define threadgroup
#define constant const
#define kernel

namespace metal {}
using std::sqrt;
using std::fabs;

static inline uint16_t th_f32_to_f16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) {  // Inf or NaN
        return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
    }
    if (absx >= 0x477ff000u) {  // rounds to >= 65520: overflow to Inf
        return (uint16_t)(sign | 0x7c00u);
    }
    if (absx < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        if (absx < 0x33000000u) return (uint16_t)sign;  // < half of the smallest subnormal: zero
        const uint32_t e = absx >> 23;
        const uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e;  // 113 - e + 13
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u);
        const uint32_t half_ulp = 1u << (shift - 1u);
        if (rem > half_ulp || (rem == half_ulp && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((absx >> 13) - (112u << 10));
    const uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
}

static inline float th_f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    uint32_t x;
    if (e == 0) {
        if (m == 0) {
            x = sign;
        } else {  // subnormal half: normalise
            int ee = -1;
            uint32_t mm = m;
            do { mm <<= 1; ee++; } while (!(mm & 0x400u));
            x = sign | ((uint32_t)(112 - ee) << 23) | ((mm & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

struct half {
    uint16_t bits;
    half() = default;
    half(float f) : bits(th_f32_to_f16_bits(f)) {}
    half(double f) : bits(th_f32_to_f16_bits((float)f)) {}
    half(int i) : bits(th_f32_to_f16_bits((float)i)) {}
    operator float() const { return th_f16_bits_to_f32(bits); }
    half & operator*=(half o) { *this = half((float)*this * (float)o); return *this; }
    half & operator+=(half o) { *this = half((float)*this + (float)o); return *this; }
    half & operator-=(half o) { *this = half((float)*this - (float)o); return *this; }
};
static inline half operator+(half a, half b) { return half((float)a + (float)b); }
static inline half operator-(half a, half b) { return half((float)a - (float)b); }
static inline half operator*(half a, half b) { return half((float)a * (float)b); }
static inline half operator/(half a, half b) { return half((float)a / (float)b); }
static inline half operator-(half a) { return half(-(float)a); }

// the Metal `h` literal suffix (reserved without '_' in ISO C++: the warning is silenced by the build flags)
static inline half operator""h(long double v) { return half((float)v); }
static inline half operator""h(unsigned long long v) { return half((float)v); }

template <typename T> struct th_vec2 {
    T x, y;
    th_vec2() = default;
    th_vec2(T a, T b) : x(a), y(b) {}
    explicit th_vec2(T a) : x(a), y(a) {}
    T & operator[](int i) { return i ? y : x; }
    T operator[](int i) const { return i ? y : x; }
};

template <typename T> struct th_vec4 {
    T x, y, z, w;
    th_vec4() = default;
    th_vec4(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
    explicit th_vec4(T a) : x(a), y(a), z(a), w(a) {}
    template <typename U> explicit th_vec4(const th_vec4<U> & o) : x(T(o.x)), y(T(o.y)), z(T(o.z)), w(T(o.w)) {}
    T & operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
    T operator[](int i) const { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
    th_vec4 & operator*=(const th_vec4 & o) { x = x * o.x; y = y * o.y; z = z * o.z; w = w * o.w; return *this; }
    th_vec4 & operator+=(const th_vec4 & o) { x = x + o.x; y = y + o.y; z = z + o.z; w = w + o.w; return *this; }
};
template <typename T> th_vec4<T> operator+(const th_vec4<T> & a, const th_vec4<T> & b) {
    return th_vec4<T>(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
template <typename T> th_vec4<T> operator-(const th_vec4<T> & a, const th_vec4<T> & b) {
    return th_vec4<T>(a.x - b.x, a.y - b.y, a.z - b.z, a.w - b.w);
}
template <typename T> th_vec4<T> operator*(const th_vec4<T> & a, const th_vec4<T> & b) {
    return th_vec4<T>(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w);
}
template <typename T> th_vec4<T> operator*(const th_vec4<T> & a, T s) { return th_vec4<T>(a.x * s, a.y * s, a.z * s, a.w * s); }
template <typename T> th_vec4<T> operator*(T s, const th_vec4<T> & a) { return a * s; }

typedef th_vec4<float> float4;
typedef th_vec4<half> half4;
typedef th_vec2<half> half2;
typedef th_vec2<float> float2;
typedef unsigned int uint;
typedef unsigned short ushort;

struct uint3 {
    uint x, y, z;
};

struct float4x4 {
    float4 c[4];
    float4 & operator[](int i) { return c[i]; }
    const float4 & operator[](int i) const { return c[i]; }
};

#endif
