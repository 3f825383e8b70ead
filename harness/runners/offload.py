"""Where a model-level run's layers go: the tool arguments and environment that put them on the backend a report
names, for the sweep (:func:`sweep_device_env`) and the MODEL check (:func:`model_offload`).

- CPU: on a build with a GPU backend, ``-dev none -ngl 0`` and the GPU backends' hide variables, for the sweep
  (:func:`cpu_only`) as for MODEL and the CPU side of a cross-backend sweep; a CPU-only build gets nothing added.

- Vulkan: ggml-vulkan uses only discrete and integrated GPUs unless ``GGML_VK_VISIBLE_DEVICES`` names device indices,
  so on a machine whose only Vulkan device is Mesa's lavapipe the fork's tools see none, ignore ``-ngl`` and run on
  the CPU. ``verify --target vulkan`` names the software devices itself (:func:`harness.fork.vulkan.device_env`);
  the sweep and MODEL runs do the same here, and say when the device is a software one (shader logic, not GPU
  arithmetic: :func:`harness.fork.backends.examination`).
- Remote devices (``rpcN``): the tools register the rpc-servers only when given the fork's own ``--rpc HOST:PORT``;
  ``-dev RPCn -ngl 99`` then puts every layer on that remote device alone (not split with a local GPU), so a
  local run is never labelled as the remote one. Device names are ggml's (``RPC0`` is the first device of the first
  endpoint given, ggml-rpc.cpp ``ggml_backend_rpc_add_server``), and ``--rpc`` comes before ``-dev`` on the command
  line: both tools resolve a device name when they parse it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from harness.errors import HarnessError
from harness.fork import backends
from harness.fork import rpc as R

OFFLOAD_ALL = "99"  # -ngl: every layer of the small models the harness runs (more than any of them has)


def vulkan_facts(environ: dict | None = None) -> dict:
    """What a Vulkan side's tools need and see on this machine (devices from :func:`harness.fork.vulkan.list_devices`,
    which tests replace with a fake list).

    Args:
        environ: the environment the tools inherit (default ``os.environ``; not changed).
    Returns:
        {'env': the variables to add ({'GGML_VK_VISIBLE_DEVICES': '0'} when the harness names the software devices,
        else {}), 'visible_devices': the note for the report ('' when nothing was set), 'driver': the driver line,
        'devices': names of the devices the tools use, 'software': the examination note when one of them is a
        software device ('Vulkan on a software device (lavapipe): shader logic, not GPU arithmetic'), else ''}.
    """
    from harness.fork import vulkan
    environ = dict(os.environ if environ is None else environ)
    devs = vulkan.list_devices()
    new, note = vulkan.device_env(environ, devs)
    added = {k: v for k, v in new.items() if environ.get(k) != v}
    chosen = new.get(vulkan.VISIBLE_ENV)
    if chosen is not None:  # set by the harness or the user: exactly the devices it names
        want = {s.strip() for s in chosen.split(",") if s.strip()}
        used = [d for d in devs or [] if str(d["index"]) in want]
    else:  # ggml's default: the GPU-type devices only
        used = [d for d in devs or [] if not vulkan.is_software(d)]
    soft = [backends.examination("vulkan", d["name"], d.get("driver_name", ""))[1] for d in used]
    return {"env": added, "visible_devices": note, "driver": vulkan.driver_line(devs),
            "devices": [d["name"] for d in used], "software": next((s for s in soft if s), "")}


def build_gpu_backends(bdir) -> list[str]:
    """The GPU backends built into a build folder, in table order: those its CMakeCache.txt switches on (the backend
    table's CMake option, e.g. ``GGML_CUDA:BOOL=ON``) or whose ggml library (``bin/libggml-<name>.*``, a
    GGML_BACKEND_DL build) it holds; [] for a CPU-only build or a folder with neither (a fake build in tests)."""
    from pathlib import Path

    from harness.fork.cmake_util import read_cmake_cache
    cache = read_cmake_cache(Path(bdir))
    out = []
    for b in backends.TABLE:
        if b.name == "cpu":
            continue
        opts = [o[2:].split("=")[0] for o in b.cmake if o.startswith("-D") and o.endswith("=ON")]
        if any(cache.get(o, "").upper() in ("ON", "1", "TRUE", "YES") for o in opts) or \
                any((Path(bdir) / "bin").glob(f"libggml-{b.name}.*")):
            out.append(b.name)
    return out


def cpu_only(cfg):
    """The CPU sweep ``cfg`` kept on the CPU: on a build with a GPU backend (:func:`build_gpu_backends`) ``-dev none``
    (beside its ``-ngl 0``) and every GPU backend's hide_env (``CUDA_VISIBLE_DEVICES=''`` ...), as the CPU side of a
    cross-backend sweep has (:func:`harness.runners.xbackend.side_config`) and MODEL on the CPU has
    (:func:`model_offload`): without them the tools of a CUDA build still offload big matrix products (and with
    ``-ngl`` left to them, every layer) to the GPU, and the 'cpu' numbers would be the GPU's. A CPU-only build, a
    side that offloads (``ngl`` > 0), names its devices or uses ``--rpc`` is returned unchanged (its command lines and
    cached results stay as they were)."""
    if (cfg.backend or "cpu") != "cpu" or cfg.ngl > 0 or cfg.rpc or cfg.devices or not build_gpu_backends(cfg.bdir):
        return cfg
    hide = {k: v for b in backends.TABLE if b.name != "cpu" for k, v in b.hide_env}
    return replace(cfg, devices="none", extra_env={**cfg.extra_env, **hide})


def sweep_device_env(cfg):
    """The sweep side ``cfg`` (:class:`harness.runners.sweep_config.SweepConfig`) with what its backend's device needs.

    A CPU side: :func:`cpu_only`. A side that offloads (``ngl`` > 0) to a backend with a visibility variable (Vulkan:
    ``GGML_VK_VISIBLE_DEVICES``) and no ``--rpc`` server gets the variable in ``extra_env`` when the machine's only
    devices are software ones (:func:`vulkan_facts`), and ``device_facts`` for the report; any other side is returned
    unchanged, as is a side that has its facts already (the call is idempotent: the cross-backend sweep makes them
    once per side).
    """
    cfg = cpu_only(cfg)
    spec = backends.find(cfg.backend or "")
    if cfg.device_facts or cfg.ngl <= 0 or cfg.rpc or spec is None or spec.visible_env is None:
        return cfg
    facts = vulkan_facts({**os.environ, **cfg.env()})
    label = f"{cfg.backend}" + (f" ({', '.join(facts['devices'])})" if facts["devices"] else "")
    if facts["software"]:
        label += f": {facts['software']}"
    facts = {**facts, "label": label}
    return replace(cfg, extra_env={**cfg.extra_env, **facts["env"]}, device_facts=facts)


def backends_run(cfg, build_backend: str | None = None) -> list[str]:
    """Where a sweep side's layers went, for the report: ['cpu'] without offload; the remote servers alone
    (['rpc HOST:PORT']) for a side whose device list names only RPC devices (``-dev RPC0``); else the build's backend
    (``build_backend``, default the side's) with its device and, for a software device, what that means
    (:func:`sweep_device_env`), and any remote servers beside it."""
    if cfg.ngl <= 0:
        return ["cpu"]
    remote = [f"rpc {ep}" for ep in cfg.rpc]
    if remote and cfg.devices and all(d.startswith("RPC") for d in cfg.devices.split(",")):
        return remote
    return [cfg.device_facts.get("label") or build_backend or cfg.backend] + remote


@dataclass(frozen=True)
class Offload:
    """The arguments and environment additions that put a tool's layers on one backend's device.

    Attributes:
        args: tool arguments ('--rpc', 'HOST:PORT', '-dev', 'RPC0', '-ngl', '99'); () for the CPU.
        env: variables added to the tool's environment ({'GGML_VK_VISIBLE_DEVICES': '0'}).
        device: ggml's name of the device the layers must go to ('Vulkan0', 'RPC0'; '' for the CPU): its
            'using device <name>' line must be in the tool's log.
        notes: one line per thing set, for the report.
    """

    args: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    device: str = ""
    notes: tuple[str, ...] = ()


def model_offload(target, backend: str | None) -> Offload:
    """Where the MODEL check's tools put the layers for ``backend`` of a fork target
    (:class:`harness.targets.fork.ForkTarget`).

    cpu or None: on a build with a local GPU backend ``-dev none -ngl 0`` (the tools' default, ``-ngl`` auto, would
    put every layer on the GPU and the cells would be filed as the CPU's), else nothing (the tools' defaults). rpcN: ``--rpc`` with every endpoint of the target, in its
    order (so ggml numbers the remote devices as the probe did), ``-dev RPCn -ngl 99``. Any other backend:
    ``-dev <its device> -ngl 99`` and, on a build with Vulkan, the visibility variable the target set for the probe.

    Raises:
        HarnessError: the backend has no device in the target (one line naming those it has).
    """
    if not backend or backend == "cpu":
        gpus = [b.name for b in target.backends() if b.name != "cpu" and b.kind != "cpu" and not R.is_rpc_backend(b.name)]
        if gpus:
            return Offload(("-dev", "none", "-ngl", "0"), {}, "",
                           (f"tools run with -dev none -ngl 0: every layer on the CPU, none on {', '.join(gpus)}",))
        return Offload()
    names = {b.name: b for b in target.backends()}
    if backend not in names:
        raise HarnessError(f"MODEL on {backend}: the build has no {backend} device here (has: {', '.join(names)})")
    device = names[backend].device
    if R.is_rpc_backend(backend):
        eps = list(getattr(target, "rpc", []) or [])
        return Offload(("--rpc", ",".join(eps), "-dev", device, "-ngl", OFFLOAD_ALL), {}, device,
                       (f"tools run with --rpc {','.join(eps)} -dev {device} -ngl {OFFLOAD_ALL}: every layer on "
                        f"{backend} ({target.rpc_endpoint(backend)})",))
    env, notes = {}, [f"tools run with -dev {device} -ngl {OFFLOAD_ALL}: every layer on {backend}"]
    spec = backends.find(backend)
    tenv = getattr(target, "env", None) or {}
    if spec is not None and spec.visible_env and spec.visible_env in tenv and os.environ.get(spec.visible_env) is None:
        env[spec.visible_env] = tenv[spec.visible_env]  # the value the target gave its probe (harness.fork.vulkan)
        vk = getattr(target, "vulkan", None) or {}
        notes.append(vk.get("visible_devices") or f"{spec.visible_env}={env[spec.visible_env]} set by the harness")
    return Offload(("-dev", device, "-ngl", OFFLOAD_ALL), env, device, tuple(notes))
