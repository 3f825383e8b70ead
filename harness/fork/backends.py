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
        title: the backend's name in prose ('Vulkan').
        software: conformant software drivers of this backend, as (lower-case fragment of the device name or
            driver, name in prose): a device matching one is examined as "executed on a software device"
            (:func:`examination`).
        visible_env: the environment variable through which ggml is told which devices of this backend to use
            (set by the harness for software devices, which ggml ignores otherwise; :mod:`harness.fork.vulkan`).
    """

    name: str
    cmake: tuple[str, ...]
    registry: tuple[str, ...]
    quantize: tuple[str, ...]
    decode: tuple[str, ...]
    hardware: str
    hide_env: tuple[tuple[str, str], ...] = ()
    title: str = ""
    software: tuple[tuple[str, str], ...] = ()
    visible_env: str | None = None


# How a backend's cells were examined (spec "Every backend, and how it was examined"); kept on each Backend of a
# target (harness.targets.base.Backend.mode) so that cells, coverage and reports can say it.
EXECUTED = "executed"
EXECUTED_SOFTWARE = "software"  # keys of harness.targets.base.MODES


def examination(name: str, device: str = "", description: str = "") -> tuple[str, str]:
    """How a device of a backend is examined: (mode, note for cells and coverage).

    A device whose name or description matches one of its row's :attr:`BackendSpec.software` drivers is
    (:data:`EXECUTED_SOFTWARE`, 'Vulkan on a software device (lavapipe): shader logic, not GPU arithmetic');
    any other local device is (:data:`EXECUTED`, '').
    """
    spec = find(name)
    text = f"{device} {description}".lower()
    for frag, prose in (spec.software if spec else ()):
        if frag in text:
            return EXECUTED_SOFTWARE, f"{spec.title or spec.name} on a software device ({prose}): shader logic, not GPU arithmetic"
    return EXECUTED, ""


_GPU_Q, _GPU_D = ("set_rows",), ("cpy", "get_rows", "fa_decode")

TABLE: tuple[BackendSpec, ...] = (
    BackendSpec("cpu", ("-DGGML_METAL=OFF", "-DGGML_CUDA=OFF"), ("cpu",), ("set_rows", "quantize_chunk"), ("to_float",),
                "any CPU", title="CPU"),
    BackendSpec("cuda", ("-DGGML_CUDA=ON",), ("cuda",), _GPU_Q, _GPU_D, "an NVIDIA GPU and the CUDA toolkit",
                (("CUDA_VISIBLE_DEVICES", ""),)),
    BackendSpec("metal", ("-DGGML_METAL=ON",), ("metal", "mtl"), _GPU_Q, _GPU_D, "an Apple GPU"),
    # lavapipe (Mesa's software Vulkan device) reports itself as 'llvmpipe (LLVM ..)'
    BackendSpec("vulkan", ("-DGGML_VULKAN=ON",), ("vulkan",), _GPU_Q, _GPU_D,
                "a Vulkan driver (a GPU's, or Mesa's lavapipe: apt-get install mesa-vulkan-drivers) and the Vulkan "
                "loader", (("GGML_VK_VISIBLE_DEVICES", ""),), title="Vulkan",
                software=(("llvmpipe", "lavapipe"), ("lavapipe", "lavapipe"), ("swiftshader", "SwiftShader")),
                visible_env="GGML_VK_VISIBLE_DEVICES"),
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
