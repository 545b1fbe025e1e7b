"""The GPUs this machine could offer: NVIDIA ones, found through NVML (the `pynvml` module of
nvidia-ml-py) when it is installed and a driver answers, else through `nvidia-smi`'s CSV query.
No GPU, no driver or no tool is the ordinary case and gives [] — never an error, since a node
without a GPU simply offers none. GPU time earns more (see docs/economy.md), so a node that
has one advertises it, subject to the owner's `gpu_only_when_idle` preference (edge/idle.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

# What we ask nvidia-smi for; the parser reads the header, so the order is not load-bearing.
QUERY_FIELDS = ("index", "name", "uuid", "memory.total", "memory.used", "utilization.gpu")
NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str | None = None
    memory_mb: int | None = None
    memory_used_mb: int | None = None
    utilization_percent: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "memory_mb": self.memory_mb,
            "memory_used_mb": self.memory_used_mb,
            "utilization_percent": self.utilization_percent,
        }


def _number(text: str) -> int | None:
    """'24576 MiB' / '5 %' / '24576' -> int; '[N/A]', '[Not Supported]', '' -> None."""
    value = text.strip()
    if not value or value.startswith("["):
        return None
    value = value.split()[0]
    try:
        return int(float(value))
    except ValueError:
        return None


def _text(value: str) -> str | None:
    value = value.strip()
    return None if not value or value.startswith("[") else value


def parse_nvidia_smi_csv(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=... --format=csv` output (header line, then one line per
    GPU; units such as `MiB` and `%` may follow numbers). Lines that do not parse are skipped:
    a GPU we cannot describe is a GPU we do not offer."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    # "memory.total [MiB]" -> "memory.total"
    header = [h.strip().split(" [")[0].strip() for h in lines[0].split(",")]
    if "index" not in header and "name" not in header:
        return []  # not the output we asked for (an error message, a driver complaint)
    gpus = []
    for position, line in enumerate(lines[1:]):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < len(header):
            continue
        if len(cells) > len(header) and "name" in header:
            # a name with commas in it: glue the extra cells back into the name
            at, extra = header.index("name"), len(cells) - len(header)
            cells[at : at + extra + 1] = [", ".join(cells[at : at + extra + 1])]
        row = dict(zip(header, cells, strict=True))
        index = _number(row.get("index", "")) if "index" in row else position
        name = _text(row.get("name", "")) or "NVIDIA GPU"
        if index is None:
            continue
        gpus.append(
            Gpu(
                index=index,
                name=name,
                uuid=_text(row.get("uuid", "")),
                memory_mb=_number(row.get("memory.total", "")),
                memory_used_mb=_number(row.get("memory.used", "")),
                utilization_percent=_number(row.get("utilization.gpu", "")),
            )
        )
    return gpus


def _from_nvml() -> list[Gpu] | None:
    """GPUs through NVML, or None when NVML is not usable here (no module, no driver)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded...: no NVIDIA GPU here
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util: int | None = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # not supported on some boards
                util = None
            gpus.append(
                Gpu(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    memory_mb=int(mem.total // (1024 * 1024)),
                    memory_used_mb=int(mem.used // (1024 * 1024)),
                    utilization_percent=util,
                )
            )
        return gpus
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _from_nvidia_smi(binary: str | None = None) -> list[Gpu]:
    exe = binary or shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run(
            [exe, "--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:  # "NVIDIA-SMI has failed because it couldn't communicate..."
        return []
    return parse_nvidia_smi_csv(done.stdout)


def no_nvidia_driver(proc: str = "/proc", dev: str = "/dev") -> bool:
    """True where no NVIDIA driver can answer: a Linux kernel without the nvidia module (its
    /proc/driver/nvidia), no /dev/nvidiactl (what a container given a GPU gets) and no WSL
    GPU bridge (/dev/dxg). Most nodes have no GPU: they skip loading NVML (~4 MB of memory)
    and running nvidia-smi. Where there is no /proc (not Linux), both are asked."""
    signs = (os.path.join(proc, "driver", "nvidia"), os.path.join(dev, "nvidiactl"),
             os.path.join(dev, "dxg"))  # fmt: skip
    return os.path.isdir(os.path.join(proc, "self")) and not any(map(os.path.exists, signs))


def detect() -> list[Gpu]:
    """The NVIDIA GPUs here: NVML first (a stable API), nvidia-smi otherwise; [] when none."""
    if no_nvidia_driver():
        return []
    found = _from_nvml()
    if found is not None:
        return found
    return _from_nvidia_smi()
