"""Optional packages: whether one is installed in a version the pack can use, and how to get it."""
from __future__ import annotations

import importlib.metadata
import importlib.util


def version_tuple(v: str) -> tuple[int, ...]:
    """'2.1.1+cu124' -> (2, 1, 1); non-digits in a part are dropped."""
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def why_missing(module: str, pip_name: str, lowest: str, note: str = "") -> str | None:
    """None if `module` imports from `pip_name` `lowest` or newer; else the reason, a ';', and the
    fix (`note`, e.g. '(built for your torch and CUDA)', goes after the install command)."""
    if importlib.util.find_spec(module) is None:
        return f"the package {pip_name} is not installed; install it with `pip install {pip_name}>={lowest}`" \
               f"{' ' + note if note else ''}, or pick another attention backend"
    have = importlib.metadata.version(pip_name)
    if version_tuple(have) < version_tuple(lowest):
        return f"{pip_name} {have} is installed but {lowest} or newer is needed; " \
               f"upgrade with `pip install -U {pip_name}>={lowest}`"
    return None
