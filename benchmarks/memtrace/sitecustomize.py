"""Where a process's host memory goes, for every Python process started with this folder on ``PYTHONPATH``
(Fabric's CPU workers included, since they inherit the environment):

    PYTHONPATH=benchmarks/memtrace FQ_MEMTRACE=/tmp/trace python recipes/qlora.py ...

- A thread reads the RSS every millisecond; at each new high (by 1 MiB or more) it keeps the main thread's stack, so
  the stack at the peak says which operation reached it.
- After every optimizer step it prints the bytes of live tensors reachable from Python, the process's brk heap and
  anonymous mappings, and the mappings created since the previous step: memory that grows while the live tensors
  do not is held below Python (how the per-shape oneDNN kernels in docs/fsdp.md were found).
Writes ``$FQ_MEMTRACE.<pid>.<rank>.json`` (the highs with their stacks, an RSS timeline) at exit.
"""

import atexit
import gc
import json
import os
import sys
import threading
import time
import traceback
import warnings

_OUT = os.environ.get("FQ_MEMTRACE")
_PAGE = os.sysconf("SC_PAGE_SIZE") if _OUT else 0
_state = {"max": 0, "highs": [], "timeline": [], "maps": None}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _sample(main: int) -> None:
    last = 0.0
    while True:
        rss, now = _rss(), time.time()
        if rss > _state["max"] + (1 << 20):
            _state["max"] = rss
            frame = sys._current_frames().get(main)
            stack = traceback.extract_stack(frame)[-14:] if frame else []
            _state["highs"].append(
                {
                    "t": now,
                    "rss_mb": rss / 2**20,
                    "stack": [f"{os.path.basename(s.filename)}:{s.lineno} {s.name}" for s in stack],
                }
            )
        if now - last > 0.5:
            _state["timeline"].append((now, rss / 2**20))
            last = now
        time.sleep(0.001)


def _mappings() -> dict[str, tuple[str, int]]:
    maps, current = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                current = parts[0]
                maps[current] = (parts[5] if len(parts) > 5 else "anon", 0)
            elif parts[0] == "Rss:":
                maps[current] = (maps[current][0], int(parts[1]) * 1024)
    return maps


def _after_step(optimizer, args, kwargs) -> None:
    import torch

    seen, live = set(), 0
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        t = getattr(obj, "_local_tensor", obj)
        storage = t.untyped_storage() if t.device.type == "cpu" else None
        if storage is not None and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            live += storage.nbytes()
    maps = _mappings()
    heap = sum(r for name, r in maps.values() if name == "[heap]")
    anon = sum(r for name, r in maps.values() if name == "anon")
    new = [r for key, (name, r) in maps.items() if name == "anon" and key not in (_state["maps"] or maps)]
    _state["maps"] = maps
    print(f"[memtrace] rank {os.environ.get('LOCAL_RANK', '0')}: rss {_rss() / 2**20:.0f} MB, peak"
          f" {_state['max'] / 2**20:.0f}, live tensors {live / 2**20:.0f}, heap {heap / 2**20:.0f}, anonymous"
          f" {anon / 2**20:.0f}; {len(new)} new mappings ({sum(new) / 2**20:.0f} MB)", flush=True)  # fmt: skip


def _dump() -> None:
    rank = os.environ.get("LOCAL_RANK", "0")
    with open(f"{_OUT}.{os.getpid()}.{rank}.json", "w") as f:
        json.dump({k: v for k, v in _state.items() if k != "maps"}, f)


def _hook_optimizer() -> None:
    # wait for the program to import torch itself (importing it here, during site setup, half-initialises it)
    while "torch.optim.optimizer" not in sys.modules or not hasattr(
        sys.modules["torch.optim.optimizer"], "register_optimizer_step_post_hook"
    ):
        time.sleep(0.2)
    sys.modules["torch.optim.optimizer"].register_optimizer_step_post_hook(_after_step)


if _OUT:
    threading.Thread(target=_sample, args=(threading.main_thread().ident,), daemon=True).start()
    threading.Thread(target=_hook_optimizer, daemon=True).start()
    atexit.register(_dump)
