"""Starts ComfyUI's main.py with the arguments given, after making torchvision importable.

Usage: python comfy_launcher.py COMFYUI_DIR [main.py arguments...]

With ZIMAGE_E2E_PARENT_PID set (the tests set it to their own pid), the server also exits by
itself when that process is gone, so a test run that is killed leaves no ComfyUI behind.

A CPU torch beside a torchvision wheel built for another torch fails to import with
"operator torchvision::nms does not exist": torchvision's C++ ops do not load, and its fake-op
registrations then look up ops that were never defined. Defining the two ops' schemas through
torch.library gets past that; torchvision's Python code (all ComfyUI uses of it) works as usual.
When torchvision imports cleanly nothing is changed.
"""
from __future__ import annotations

import os
import runpy
import sys
import threading
import time

TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def make_torchvision_importable() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: ComfyUI says so itself
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in TORCHVISION_SCHEMAS:
        lib.define(schema)
    make_torchvision_importable._lib = lib  # keep the definitions alive
    import torchvision  # noqa: F401,F811


def exit_with_parent() -> None:
    parent = os.environ.get("ZIMAGE_E2E_PARENT_PID")
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(2.0)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main() -> None:
    comfy_dir = os.path.abspath(sys.argv[1])
    exit_with_parent()
    make_torchvision_importable()
    main_py = os.path.join(comfy_dir, "main.py")
    sys.argv = [main_py] + sys.argv[2:]
    sys.path[0] = comfy_dir  # as `python main.py` would have it
    os.chdir(comfy_dir)
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
