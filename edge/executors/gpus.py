"""The GPUs a node gives one job, as the docker and native executors take them: the job dict's
"gpus", `[{"index": 0, "uuid": "GPU-8f1c…"}, …]`, chosen by the node among its own NVIDIA GPUs
(absent or empty: the job gets none). `index` is the GPU's NVML index (as nvidia-smi numbers
it), `uuid` its NVML UUID, or None where the node does not know it.
Other keys are the node's business and are left alone. Wasm jobs never get GPUs.

Both executors name a GPU by its UUID where known, else by its index (`gpu_ids`): a UUID
stays right whatever order the driver numbers the GPUs in. The GPU environment variables are
the node's, not the job's (`GPU_ENV`): a job cannot ask for more GPUs by setting them.
"""

from __future__ import annotations

import re
from typing import Any

MAX_GPUS = 64  # as resources.gpu's bound on the hub
MAX_INDEX = 1023
# NVML's "GPU-<hex>-…" (and "MIG-…"): no ',' (the variables' separator), '=' or '/'
_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
GPU_ENV = (CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES)


def gpus_problem(gpus: Any) -> str | None:
    """What is wrong with a job's "gpus", or None (the executors' one check of its shape)."""
    if gpus is None:
        return None
    if not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
        return f"gpus must be a list of at most {MAX_GPUS} GPUs"
    seen: set[int] = set()
    for i, gpu in enumerate(gpus):
        if not isinstance(gpu, dict):
            return f'gpus[{i}] must be an object like {{"index": 0, "uuid": "GPU-…"}}'
        index = gpu.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_INDEX:
            return f"gpus[{i}].index must be a whole number from 0 to {MAX_INDEX}"
        uuid = gpu.get("uuid")
        if uuid is not None and (not isinstance(uuid, str) or not _UUID.match(uuid)):
            return (
                f"gpus[{i}].uuid must be null or a GPU's UUID like GPU-8f1c… (letters, digits, "
                "'-', '.', ':' and '_')"
            )
        if index in seen:
            return f"gpus[{i}]: GPU {index} is given twice"
        seen.add(index)
    return None


def gpu_ids(gpus: list[dict[str, Any]] | None) -> list[str]:
    """Each GPU's name for the driver and the container toolkit: its UUID, else its index."""
    return [gpu.get("uuid") or str(gpu["index"]) for gpu in gpus or []]
