"""The one backend table: each ggml backend the harness knows, with its CMake flags, the ggml registry names that
mean it, the routes the harness measures on it and the words its help and error messages use.

Read by the build (:func:`harness.fork.build.cmake_options`), the probe's device listing
(:func:`harness.targets.fork.select_backends`, :meth:`harness.targets.fork.ForkTarget.routes`), the command-line
checks and help (:mod:`harness.usage`, ``--backend`` help texts) and the reports (backends not available). A new
backend is one row here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackendSpec:
    """One backend.

    Attributes:
        name: short name used on the command line, in build folders (build/<name>) and in cell paths.
        cmake: CMake options that select it (ggml's GGML_<NAME> switches).
        registry: lower-case ggml backend-registry names that mean it ('cuda'; 'rocm' and 'hip' for HIP).
        quantize: quantise routes measured on it ('set_rows': the graph op; 'quantize_chunk': ggml's reference
            quantiser, CPU only).
        decode: decode routes, in the order tried ('to_float': the CPU type traits; 'cpy' / 'get_rows': the GPU ops;
            'fa_decode': flash attention over one KV row, for a backend without a decode op).
        hardware: what a machine needs to build and run it (used in the fix of an error message).
        hide_env: variables that hide its devices from a process of a build that has it, so that the tools run on
            the CPU alone (the CPU side of a cross-backend sweep, :mod:`harness.runners.xbackend`); () when none is
            known (then only ``-ngl 0 -dev none`` keeps the tools off it).
    """

    name: str
    cmake: tuple[str, ...]
    registry: tuple[str, ...]
    quantize: tuple[str, ...]
    decode: tuple[str, ...]
    hardware: str
    hide_env: tuple[tuple[str, str], ...] = ()


_GPU_Q, _GPU_D = ("set_rows",), ("cpy", "get_rows", "fa_decode")

TABLE: tuple[BackendSpec, ...] = (
    BackendSpec("cpu", ("-DGGML_METAL=OFF", "-DGGML_CUDA=OFF"), ("cpu",), ("set_rows", "quantize_chunk"), ("to_float",),
                "any CPU"),
    BackendSpec("cuda", ("-DGGML_CUDA=ON",), ("cuda",), _GPU_Q, _GPU_D, "an NVIDIA GPU and the CUDA toolkit",
                (("CUDA_VISIBLE_DEVICES", ""),)),
    BackendSpec("metal", ("-DGGML_METAL=ON",), ("metal", "mtl"), _GPU_Q, _GPU_D, "an Apple GPU"),
    BackendSpec("vulkan", ("-DGGML_VULKAN=ON",), ("vulkan",), _GPU_Q, _GPU_D,
                "a GPU with a Vulkan driver and the Vulkan SDK"),
    BackendSpec("hip", ("-DGGML_HIP=ON",), ("hip", "rocm"), _GPU_Q, _GPU_D, "an AMD GPU and ROCm",
                (("HIP_VISIBLE_DEVICES", ""), ("ROCR_VISIBLE_DEVICES", ""))),
)


def names() -> tuple[str, ...]:
    """The backend names, in table order ('cpu', 'cuda', 'metal', 'vulkan', 'hip')."""
    return tuple(b.name for b in TABLE)


def find(name: str) -> BackendSpec | None:
    """The row of a backend name (case-insensitive), or None for a name the table does not know."""
    n = name.strip().lower()
    return next((b for b in TABLE if b.name == n), None)


def from_registry(reg_name: str) -> str:
    """Short backend name for a ggml registry name ('CUDA' -> 'cuda', 'ROCm' -> 'hip', 'MTL' -> 'metal'); a
    registry the table does not know keeps its lower-cased name."""
    r = reg_name.lower()
    return next((b.name for b in TABLE if r in b.registry), r)


def choices(sep: str = " | ") -> str:
    """The backend names for help texts ('cpu | cuda | metal | vulkan | hip')."""
    return sep.join(names())
